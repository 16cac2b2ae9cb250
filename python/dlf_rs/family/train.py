"""Train dlf_rs's default family of tiny Llama models on the synthetic world, from fixed seeds.

Where it sits: `dlf_rs.family.world` defines the data; this script turns it into the checkpoints shipped
in `python/dlf_rs/family/checkpoints/` (small base, one small expert per seen task, large base, and as
references the large fine-tuned per task and the large multi-task tuned), plus `manifest.json`
with seeds, configs and the metrics each model reaches. `dlf_rs.demo` then decodes with them.

    python -m dlf_rs.family.train --out DIR            # train everything (about 20 min, 2 cores)
    python -m dlf_rs.family.train --out DIR --check    # ... and compare with the shipped manifest

Reproducibility: every model's initialisation and data order come from its own seed
(`torch.manual_seed`, seeded `random`); runs on CPU are bit-for-bit repeatable on one machine, and
on other hardware the metrics agree within the tolerance `--check` applies.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dlf_rs.family.world import (
    SEEN_TASKS,
    TASKS,
    Example,
    World,
    build_tokenizer,
    eval_set,
    finetune_set,
    pretraining_documents,
)

DEFAULT_DIR = Path(__file__).resolve().parent / "checkpoints"
CHECK_TOLERANCE = 0.08  # absolute, on metrics in [0, 1] measured over N_EVAL examples


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    ffn: int


@dataclass(frozen=True)
class FamilyConfig:
    """Everything that determines the family; recorded verbatim in the manifest."""

    world_seed: int = 0
    n_entities: int = 2000
    name_pool: int = 50  # first and last names: 50 x 50 pairs
    small: ModelSize = ModelSize(hidden=24, layers=2, heads=4, ffn=64)
    large: ModelSize = ModelSize(hidden=96, layers=3, heads=4, ffn=384)
    pretrain_docs: int = 144_000
    pretrain_batch: int = 48
    pretrain_lr_small: float = 3e-3
    pretrain_lr_large: float = 2e-3
    finetune_examples: int = 2_000
    finetune_steps: int = 250
    finetune_batch: int = 32
    finetune_lr_small: float = 1e-3
    finetune_lr_large: float = 5e-4
    n_eval: int = 100
    seeds: dict[str, int] = field(
        default_factory=lambda: {"small_base": 11, "large_base": 12, "finetune": 13}
    )


def make_model(size: ModelSize, vocab_size: int, tok: Any, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden,
        intermediate_size=size.ffn,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def _batch(rows: list[list[int]], masks: list[list[int]], pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and labels (-100 outside the trained span)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
        labels[i, : len(r)] = torch.tensor([t if keep else -100 for t, keep in zip(r, m)])
    return ids, att, labels


def encode_documents(tok: Any, docs: list[str]) -> list[tuple[list[int], list[int]]]:
    rows = [ids + [tok.eos_token_id] for ids in tok(docs)["input_ids"]]
    return [(r, [0] + [1] * (len(r) - 1)) for r in rows]


def encode_examples(tok: Any, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """prompt + answer + eos, with the loss only on the answer and eos (supervised tuning)."""
    out = []
    for ex in examples:
        p = tok(ex.prompt)["input_ids"]
        a = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((p + a, [0] * len(p) + [1] * len(a)))
    return out


def train(
    model: Any,
    data: list[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    pad: int,
    device: str,
    desc: str,
) -> dict[str, float]:
    """AdamW, linear warmup then cosine decay; batches drawn in a seeded order."""
    from tqdm import tqdm

    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm)
        * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))),
    )
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    t0 = time.time()
    for _ in tqdm(range(steps), desc=desc, mininterval=10, file=sys.stdout):
        if len(order) < batch:
            extra = list(range(len(data)))
            rng.shuffle(extra)
            order += extra
        pick, order = order[:batch], order[batch:]
        ids, att, labels = _batch([data[i][0] for i in pick], [data[i][1] for i in pick], pad)
        loss = model(
            input_ids=ids.to(device), attention_mask=att.to(device), labels=labels.to(device)
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return {"final_loss": round(sum(tail) / len(tail), 4), "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def greedy(model: Any, tok: Any, prompts: list[str], max_new_tokens: int, device: str) -> list[str]:
    """Plain batched greedy decoding with HF generate (left padding), cut at eos."""
    out: list[str] = []
    for i in range(0, len(prompts), 64):
        enc = tok(prompts[i : i + 64], return_tensors="pt", padding=True).to(device)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


@torch.no_grad()
def fact_recall(model: Any, tok: Any, world: World, device: str) -> dict[str, float]:
    """Cloze accuracy on the corpus templates: does the model know held-out (and tuning) facts?"""
    res = {}
    for split, ents in (("held_out", world.held_out), ("tuning", world.tuning)):
        hits = total = 0
        for stem, value in (("lives in", "city"), ("works as a", "job"), ("has", "apples")):
            prompts = [f"{e.name} {stem}" for e in ents]
            want = [tok.convert_tokens_to_ids(str(getattr(e, value))) for e in ents]
            enc = tok(prompts, return_tensors="pt", padding=True).to(device)
            logits = model(**enc).logits[:, -1, :]
            hits += sum(int(a == b) for a, b in zip(logits.argmax(-1).tolist(), want))
            total += len(ents)
        res[f"facts_{split}"] = round(hits / total, 4)
    return res


def evaluate(model: Any, tok: Any, world: World, n_eval: int, device: str) -> dict[str, float]:
    """Fact recall plus every task's metric on its held-out evaluation set (zero-shot)."""
    metrics = fact_recall(model, tok, world, device)
    for name, task in TASKS.items():
        exs = eval_set(world, name, n_eval)
        preds = greedy(model, tok, [e.prompt for e in exs], task.max_new_tokens, device)
        metrics[name] = round(sum(task.score(p, e) for p, e in zip(preds, exs)) / len(exs), 4)
    return metrics


def _ship(model: Any, tok: Any, path: Path) -> Any:
    """Save float16 safetensors (size budget) and return the float32 round-trip that was shipped."""
    model = model.to("cpu").to(torch.float16)
    model.config.dtype = "float32"  # loaders upcast; the demo always runs float32
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return model.to(torch.float32)


def train_family(cfg: FamilyConfig, out: Path, device: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    world = World.build(cfg.world_seed, cfg.n_entities, cfg.name_pool, cfg.name_pool)
    tok = build_tokenizer(world)
    tok.save_pretrained(str(out / "tokenizer"))
    vocab = len(tok)
    pad = tok.pad_token_id
    t_start = time.time()
    manifest: dict[str, Any] = {
        "config": asdict(cfg),
        "torch": torch.__version__,
        "device": device,
        "vocab_size": vocab,
        "tasks": {n: {"seen": t.seen, "metric": t.metric_name} for n, t in TASKS.items()},
        "models": {},
    }

    def record(name: str, model: Any, role: str, init: str | None, stats: dict[str, Any]) -> Any:
        shipped = _ship(model, tok, out / name)
        metrics = evaluate(shipped, tok, world, cfg.n_eval, "cpu")
        manifest["models"][name] = {
            "path": name,
            "role": role,
            "init_from": init,
            "params": sum(p.numel() for p in shipped.parameters()),
            "train": stats,
            "metrics": metrics,
        }
        print(f"[{name}] {stats} {metrics}", flush=True)
        return shipped

    docs = encode_documents(
        tok, pretraining_documents(world, cfg.pretrain_docs, seed=0, arithmetic_share=0.1)
    )
    steps = cfg.pretrain_docs // cfg.pretrain_batch
    bases = {}
    for name, size, lr in (
        ("small_base", cfg.small, cfg.pretrain_lr_small),
        ("large_base", cfg.large, cfg.pretrain_lr_large),
    ):
        model = make_model(size, vocab, tok, cfg.seeds[name])
        stats: dict[str, Any] = dict(
            train(model, docs, steps=steps, batch=cfg.pretrain_batch, lr=lr,
                  seed=cfg.seeds[name], pad=pad, device=device, desc=name)
        )
        stats |= {"steps": steps, "lr": lr, "seed": cfg.seeds[name], "docs": cfg.pretrain_docs}
        bases[name] = record(name, model, "base", None, stats)

    ft_data = {t: encode_examples(tok, finetune_set(world, t, cfg.finetune_examples))
               for t in SEEN_TASKS}
    mixed = [row for t in SEEN_TASKS for row in ft_data[t]]
    jobs: list[tuple[str, str, str, list[tuple[list[int], list[int]]], int, float]] = []
    for t in SEEN_TASKS:
        jobs.append((f"small_expert_{t}", "small_base", "expert", ft_data[t],
                     cfg.finetune_steps, cfg.finetune_lr_small))
    for t in SEEN_TASKS:
        jobs.append((f"large_ft_{t}", "large_base", "reference", ft_data[t],
                     cfg.finetune_steps, cfg.finetune_lr_large))
    jobs.append(("large_mtt", "large_base", "reference", mixed,
                 cfg.finetune_steps * len(SEEN_TASKS), cfg.finetune_lr_large))
    for i, (name, init, role, data, n_steps, lr) in enumerate(jobs):
        seed = cfg.seeds["finetune"] + i
        torch.manual_seed(seed)
        model = make_model(cfg.small if init == "small_base" else cfg.large, vocab, tok, seed)
        model.load_state_dict(bases[init].state_dict())
        stats = dict(
            train(model, data, steps=n_steps, batch=cfg.finetune_batch, lr=lr, seed=seed,
                  pad=pad, device=device, desc=name)
        )
        stats |= {"steps": n_steps, "lr": lr, "seed": seed, "examples": len(data),
                  "task": name.rsplit("_", 1)[-1] if role == "expert" or "ft" in name else "all"}
        record(name, model, role, init, stats)
    manifest["total_seconds"] = round(time.time() - t_start, 1)
    n_bytes = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    manifest["checkpoint_bytes"] = n_bytes
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def compare(new: dict[str, Any], ref: dict[str, Any], tol: float = CHECK_TOLERANCE) -> list[str]:
    """Metric differences beyond `tol` between two manifests (empty list: reproduced)."""
    problems = []
    for name, entry in ref["models"].items():
        got = new["models"].get(name)
        if got is None:
            problems.append(f"{name}: missing")
            continue
        for key, want in entry["metrics"].items():
            have = got["metrics"].get(key)
            if have is None or abs(have - want) > tol:
                problems.append(f"{name}.{key}: shipped {want} vs rerun {have}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR, help="where to write the family")
    ap.add_argument("--check", action="store_true",
                    help="after training, compare metrics with the shipped manifest")
    ap.add_argument("--reference", type=Path, default=DEFAULT_DIR / "manifest.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # One thread by default: on a shared 2-core machine, two intra-op threads per process were
    # measured 10-20x slower per step than one (barrier waits while other processes hold a core).
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = json.loads(args.reference.read_text()) if args.check else None
    manifest = train_family(FamilyConfig(), args.out, args.device)
    print(f"trained in {manifest['total_seconds']} s; {manifest['checkpoint_bytes']} bytes")
    if ref is not None:
        problems = compare(manifest, ref)
        for p in problems:
            print("MISMATCH", p)
        print("reproduced within tolerance" if not problems else f"{len(problems)} mismatches")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
