"""Greedy tokens of a fused directory with --tensor-parallel-size 2 (a script: vLLM spawns its
workers, so it runs in its own process with the __main__ guard). Prints one JSON list per prompt."""

import json
import sys


def main() -> None:
    import dlf_rs.vllm as dv
    from vllm import SamplingParams

    fused, prompts = sys.argv[1], sys.argv[2:]
    llm = dv.llm(fused, dtype="float32", enforce_eager=True, max_model_len=256,
                 tensor_parallel_size=2, distributed_executor_backend="mp", seed=0)  # fmt: skip
    params = [SamplingParams(temperature=0, max_tokens=10,
                             extra_args={"dlf_alpha_log": f"tp2-row{i}"} if i == 0 else None)
              for i in range(len(prompts))]  # fmt: skip
    for out in llm.generate(prompts, params, use_tqdm=False):
        print(json.dumps(list(out.outputs[0].token_ids)))


if __name__ == "__main__":
    main()
