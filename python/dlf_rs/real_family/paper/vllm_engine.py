"""The paper rows through vLLM: ``python -m dlf_rs.real_family.paper run --engine vllm``.

Where it sits: :class:`.runner.Runner` hands a generator group (rows that share models, their
missing batches) to :func:`decode_group` instead of ``FusedGenerator``. vLLM pins its own torch
and transformers, so it lives in its own environment (``make develop-vllm``: ``.venv-vllm``)
without the paper's data readers (pyarrow) or peft. The split:

- this process (the project's environment) prepares everything: the model directory vLLM loads
  (:func:`model_dir`: the base folder; a base with a LoRA adapter merged into its own folder; for
  fused rows a fused directory, :func:`dlf_rs.engines.vllm.build_fused_dir`, the LoRA experts
  merged into full checkpoints as vLLM members must be), every prompt as token ids rendered by
  the chat template exactly as ``FusedGenerator`` renders it, and each row's per-request options
  (``dlf_*`` extra arguments: one engine serves every static and DLF row of an expert set);
- a worker (:func:`worker`, ``python -m dlf_rs.real_family.paper.vllm_engine JOB OUT`` under the
  vLLM environment's Python: ``--vllm-python``, else ``$DLF_RS_VLLM_PYTHON``, else this Python)
  starts one ``vllm.LLM`` per group and decodes the batches in order, the same fixed batches as
  the other engine (greedy; each batch one ``generate`` call, ``max_num_seqs`` the batch size),
  writing one JSON line per batch as it finishes;
- this process appends each finished batch to the row's cache file while the worker runs, so an
  interrupted run resumes where it stopped.

A row's cache file names the engine (its fingerprint has ``"engine": "vllm"``): vLLM's replies
never mix with ``FusedGenerator``'s. Texts are vLLM's (stop strings cut, special tokens
skipped); ``finish`` maps vLLM's reasons onto the project's (``eos``, ``stop``, ``length``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["VLLM_PYTHON_ENV", "decode_group", "model_dir", "request_args", "vllm_python",
           "worker"]  # fmt: skip

VLLM_PYTHON_ENV = "DLF_RS_VLLM_PYTHON"
JOB_FORMAT = "dlf_rs.real_family.paper.vllm-job/1"


def vllm_python(given: str | os.PathLike[str] | None = None) -> str:
    """The Python that runs the worker (it must import vLLM and dlf_rs)."""
    p = os.fspath(given) if given else os.environ.get(VLLM_PYTHON_ENV) or sys.executable
    if not Path(p).is_file():
        raise FileNotFoundError(
            f"vllm_python: {p} does not exist; give the vLLM environment's Python "
            f"(`make develop-vllm` builds .venv-vllm/bin/python) or set ${VLLM_PYTHON_ENV}"
        )
    return p


def request_args(options: Mapping[str, Any]) -> dict[str, Any] | None:
    """A fused row's options as a vLLM request's extra arguments (``dlf_*``); None for the single
    models' rows (their engine is a plain model)."""
    if options.get("method") not in ("dlf", "static"):
        return None
    out: dict[str, Any] = {}
    for k, v in options.items():
        out[f"dlf_{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _atomic_build(out: Path, build: Callable[[Path], None]) -> Path:
    """``build`` into a temporary sibling, then renamed: a killed run leaves no half folder."""
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        build(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _merge_into(base: Path, adapter: Path, dtype: str) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        import peft
        import torch
        import transformers

        auto: Any = transformers.AutoModelForCausalLM
        model = auto.from_pretrained(os.fspath(base), dtype=getattr(torch, dtype))
        model = peft.PeftModel.from_pretrained(model, os.fspath(adapter)).merge_and_unload()
        model.save_pretrained(tmp)
        transformers.AutoTokenizer.from_pretrained(os.fspath(base)).save_pretrained(tmp)
        gen = base / "generation_config.json"
        if gen.is_file():
            shutil.copy2(gen, tmp / gen.name)

    return build


def model_dir(root: Path, tag: str, large: Path, small: Path, merged: Path | None,
              experts: Sequence[Path], dtype: str) -> tuple[Path, bool]:  # fmt: skip
    """The folder vLLM loads for a generator group, and whether it is a fused directory.
    ``tag`` names the models' contents (digests): a folder is built once per tag, under
    ``root``. ``merged``: a LoRA adapter merged into ``large`` first (its own folder)."""
    if merged is not None:
        large = _atomic_build(root / f"merged-{tag}", _merge_into(large, merged, dtype))
    if not experts:
        return large, False

    def build(tmp: Path) -> None:
        from dlf_rs.engines.vllm import build_fused_dir

        build_fused_dir(tmp, large, small, [os.fspath(e) for e in experts], overwrite=True)

    return _atomic_build(root / f"fused-{tag}", build), True


def _finish(reason: str | None, stop_reason: Any) -> str:
    if reason == "length":
        return "length"
    return "stop" if isinstance(stop_reason, str) else "eos"


def decode_group(
    python: str,
    model: Path,
    fused: bool,
    batches: Sequence[Mapping[str, Any]],
    *,
    dtype: str,
    seed: int,
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[int, list[dict[str, Any]], float]]:
    """Decode ``batches`` in one worker: each is ``{"requests": [{"prompt_token_ids", "max_tokens",
    "stop", "extra_args", "alphas"}, ...]}``. Yields ``(index, outputs, seconds)`` per batch as
    the worker finishes it: outputs in the batch's order, each ``{"token_ids", "text", "finish",
    "alphas"}`` (``alphas``: one list per step where the request asked, else None)."""
    longest = max(len(r["prompt_token_ids"]) + r["max_tokens"] for b in batches
                  for r in b["requests"])  # fmt: skip
    job = {"format": JOB_FORMAT, "model": os.fspath(model), "fused": fused, "dtype": dtype,
           "seed": seed, "max_model_len": longest + 8,
           "max_num_seqs": max(len(b["requests"]) for b in batches), "batches": list(batches)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dlf-rs-vllm-") as tmp:
        job_path, out_path, err_path = (Path(tmp) / n for n in ("job.json", "out.jsonl", "err.log"))
        job_path.write_text(json.dumps(job), encoding="utf-8")
        out_path.touch()
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        full_env["DLF_RS_ALPHA_DIR"] = os.fspath(Path(tmp) / "alphas")  # gone with the job
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [python, "-m", "dlf_rs.real_family.paper.vllm_engine", os.fspath(job_path),
                 os.fspath(out_path)],
                stdout=err, stderr=subprocess.STDOUT, env=full_env,
            )  # fmt: skip
            done = 0
            try:
                with open(out_path, encoding="utf-8") as fh:
                    buf = ""
                    while True:
                        running = proc.poll() is None
                        buf += fh.read()
                        *lines, buf = buf.split("\n")
                        for line in lines:
                            rec = json.loads(line)
                            done += 1
                            yield rec["batch"], rec["outputs"], rec["seconds"]
                        if not running:
                            break
                        time.sleep(0.5)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if proc.returncode != 0 or done != len(batches):
            tail = err_path.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise RuntimeError(
                f"vllm: the worker ({python}) stopped with exit status {proc.returncode} after "
                f"{done} of {len(batches)} batches; its log ends:\n{tail}"
            )


# ----------------------------------------------------------------------------- the worker
def worker(job_path: str, out_path: str) -> int:
    """Run in the vLLM environment: decode the job's batches, one JSON line per batch."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import dlf_rs.engines.vllm as dv

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    if job.get("format") != JOB_FORMAT:
        raise ValueError(f"job: expected format {JOB_FORMAT}, got {job.get('format')!r}")
    kw = {"dtype": job["dtype"], "seed": job["seed"], "max_model_len": job["max_model_len"],
          "max_num_seqs": job["max_num_seqs"], "enforce_eager": True}  # fmt: skip
    llm = dv.llm(job["model"], **kw) if job["fused"] else LLM(model=job["model"], **kw)
    nonce = f"paper-{os.getpid()}-{time.time_ns()}"
    with open(out_path, "a", encoding="utf-8") as out:
        for i, batch in enumerate(job["batches"]):
            prompts, params, tags = [], [], []
            for j, r in enumerate(batch["requests"]):
                extra = dict(r.get("extra_args") or {})
                tag = f"{nonce}-{i}-{j}" if r.get("alphas") else None
                if tag:
                    extra["dlf_alpha_log"] = tag
                prompts.append(TokensPrompt(prompt_token_ids=list(r["prompt_token_ids"])))
                params.append(SamplingParams(temperature=0.0, max_tokens=r["max_tokens"],
                                             stop=list(r.get("stop") or []) or None,
                                             extra_args=extra or None))  # fmt: skip
                tags.append(tag)
            t0 = time.perf_counter()
            res = llm.generate(prompts, params, use_tqdm=False)
            sec = time.perf_counter() - t0
            outs = []
            for o, tag in zip(res, tags):
                c = o.outputs[0]
                alphas = dv.read_alphas(job["model"], tag) if tag else None
                outs.append({"token_ids": [int(t) for t in c.token_ids], "text": c.text,
                             "finish": _finish(c.finish_reason, c.stop_reason), "alphas": alphas})  # fmt: skip
            out.write(json.dumps({"batch": i, "seconds": sec, "outputs": outs}) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m dlf_rs.real_family.paper.vllm_engine JOB.json OUT.jsonl")
    sys.exit(worker(sys.argv[1], sys.argv[2]))
