"""Greedy tokens of a fused directory, run as its own process (vLLM spawns its workers: the
__main__ guard). Default: ``dlf_rs.engines.vllm.llm`` with --tensor-parallel-size 2. With ``--plain``:
vLLM's own ``LLM(dir)``, no dlf_rs call at all (the plugin must attach the logits processor),
each prompt twice (defaults, then ``dlf_alpha=1.0``), then one bad option's error.
Prints one JSON list per generation, then ``ERROR <message>`` for --plain."""

import json
import sys


def main() -> None:
    import dlf_rs.engines.vllm as dv
    from vllm import SamplingParams

    plain = sys.argv[1] == "--plain"
    fused, prompts = sys.argv[1 + plain], sys.argv[2 + plain :]
    if plain:
        from vllm import LLM

        llm = LLM(model=fused, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
        for xargs in (None, {"dlf_alpha": 1.0}):
            sp = SamplingParams(temperature=0, max_tokens=10, extra_args=xargs)
            for out in llm.generate(prompts, sp, use_tqdm=False):
                print(json.dumps(list(out.outputs[0].token_ids)))
        try:
            llm.generate(prompts[:1], SamplingParams(max_tokens=2, extra_args={"dlf_expert": 9,
                                                                               "dlf_method": "expert"}))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - printed for the test to read
            print("ERROR", str(e).splitlines()[0])
        return
    llm = dv.llm(fused, dtype="float32", enforce_eager=True, max_model_len=256,
                 tensor_parallel_size=2, distributed_executor_backend="mp", seed=0)  # fmt: skip
    params = [SamplingParams(temperature=0, max_tokens=10,
                             extra_args={"dlf_alpha_log": f"tp2-row{i}"} if i == 0 else None)
              for i in range(len(prompts))]  # fmt: skip
    for out in llm.generate(prompts, params, use_tqdm=False):
        print(json.dumps(list(out.outputs[0].token_ids)))


if __name__ == "__main__":
    main()
