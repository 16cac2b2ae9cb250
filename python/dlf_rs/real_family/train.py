"""Training the task's LoRA expert on CPU: ``python -m dlf_rs.real_family train``.

Where it sits: after ``make real-family`` (the converted small base) and before the evaluation
(:mod:`.evaluate`), which loads the adapter as an expert on the small base. The same recipe on
the large base (``--base large``) gives the evaluation's upper bound, the large model fine-tuned.

Recipe (:class:`Recipe`): the training split of :mod:`.task` (seeded), each example as the chat
conversation of :func:`.task.messages` plus the reference reply; loss on the reply tokens only
(the reply and the end-of-turn token); LoRA on every linear layer of the blocks; AdamW with a
linear warm-up and a linear decay; float32 on CPU (measured here: 2.5x faster than bfloat16 for
the 0.5B's training step). Only the reply positions go through the output layer, which is most
of the cost of a full-vocabulary loss over whole sequences.

Reproducible: every random choice comes from ``seed`` (data, LoRA initialisation, batch order).
The output folder holds the PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``)
and ``manifest.json``: the recipe, the sha256 of the training data (canonical JSON), of the base
weights and of the adapter file, the loss per step, the time taken and the versions used.

Resumable: with ``checkpoint`` (a file path), :func:`train_adapter` saves its whole state (the
LoRA weights, AdamW's moments, the step, the batch order and the random states) every
``checkpoint_every`` seconds and resumes from it when started again with the same
``checkpoint_key``; a resumed run gives the same adapter, byte for byte, as one that was never
stopped. The paper tables' 1.5B adapters take hours on 2 CPU cores, longer than a working
session; an interrupted run must not start over.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import task

__all__ = ["MANIFEST", "Recipe", "encode", "sha256_path", "train_adapter"]

MANIFEST = "manifest.json"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """Every training knob; recorded whole in the manifest."""

    examples: int = 384
    epochs: int = 1
    batch_size: int = 8
    lr: float = 4e-4
    warmup_steps: int = 6
    rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    seed: int = 0
    max_steps: int | None = None  # cut short (tests, quick checks)
    threads: int = 2


def sha256_path(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, or of a folder's weight files (name and bytes, in name order)."""
    p = Path(path)
    files = ([p] if p.is_file() else
             sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()))  # fmt: skip
    h = hashlib.sha256()
    for f in files:
        if p.is_dir():
            h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def encode(tokenizer: Any, ex: Any, prompts: Any = task) -> tuple[list[int], int]:
    """Token ids of the conversation with its reference reply, and where the reply starts.

    The prompt part is what generation feeds (the chat template with the generation prompt);
    the reply is tokenized on its own and closed with the end-of-turn token. ``prompts``: the
    task's ``messages`` and ``target_text`` (default: the vexil task module)."""
    prompt = tokenizer.apply_chat_template(prompts.messages(ex), add_generation_prompt=True,
                                           tokenize=False)  # fmt: skip
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply = tokenizer(prompts.target_text(ex), add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if not isinstance(end, int) or end == tokenizer.unk_token_id:
        end = tokenizer.eos_token_id
    return list(ids) + list(reply) + [int(end)], len(ids)


def _collate(batch: Sequence[tuple[list[int], int]], pad: int) -> tuple[Any, ...]:
    """Right-padded ids and mask, and the (row, position, label) of every reply token (the
    hidden state at position p - 1 predicts the token at p)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    labels: list[int] = []
    for b, (ids, start) in enumerate(batch):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
        rows += [b] * (len(ids) - start)
        cols += range(start - 1, len(ids) - 1)
        labels += ids[start:]
    return input_ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(labels)


def auto_micro_batch(model: Any, batch_size: int) -> int:
    """Rows per forward: the whole batch below 1B parameters, else a quarter of it (the 1.5B's
    activations for 8 rows would not fit next to the other jobs of a 24 GB machine). The
    gradient is the same either way (:func:`train_adapter` sums over micro-batches)."""
    params = sum(p.numel() for p in model.parameters())
    return batch_size if params < 1e9 else max(1, batch_size // 4)


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _tuples(x: Any) -> Any:
    """A random state read back from a checkpoint (lists where it had tuples), as tuples."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def train_adapter(
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    recipe: Recipe = Recipe(),
    *,
    examples: Sequence[Any] | None = None,
    prompts: Any = task,
    log: Callable[[str], None] = print,
    model: Any = None,
    tokenizer: Any = None,
    micro_batch: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_key: str = "",
    checkpoint_every: float = 300.0,
) -> dict[str, Any]:
    """Train a LoRA adapter on ``base`` (a model folder) with ``recipe`` and save it in ``out``
    with its manifest (returned). ``examples`` defaults to the task's training split;
    ``prompts``: what turns an example into a conversation and its reply, and digests the data
    (``messages``, ``target_text``, ``dataset_digest``; default: the vexil task module);
    ``model``/``tokenizer``: already loaded ones (tests), else loaded from ``base`` in float32.
    ``micro_batch``: rows per forward (default :func:`auto_micro_batch`); not part of the
    recipe, it does not change the gradient. ``checkpoint``, ``checkpoint_key``,
    ``checkpoint_every``: resume from and save to that file (module docstring); a checkpoint
    whose key, recipe, data or micro-batch differ is ignored (and logged). It is removed once the
    adapter is saved."""
    import peft
    import torch
    import transformers

    torch.set_num_threads(recipe.threads)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    t_start = time.perf_counter()
    data = list(examples) if examples is not None else task.make_split(
        "train", recipe.examples, recipe.seed)  # fmt: skip
    if tokenizer is None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(base))
    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(base),
                                                                  dtype=torch.float32)  # fmt: skip
    model.config.use_cache = False
    cfg = peft.LoraConfig(r=recipe.rank, lora_alpha=recipe.lora_alpha,
                          lora_dropout=recipe.lora_dropout, target_modules=list(TARGET_MODULES),
                          task_type="CAUSAL_LM")  # fmt: skip
    micro = micro_batch or auto_micro_batch(model, recipe.batch_size)
    pm = peft.get_peft_model(model, cfg)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=0.0)
    encoded = [encode(tokenizer, ex, prompts) for ex in data]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_epoch = math.ceil(len(encoded) / recipe.batch_size)
    total = per_epoch * recipe.epochs
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps)
    order_rng = random.Random(f"order/{recipe.seed}")
    causal: Any = pm.get_base_model()
    body: Any = causal.model
    head: Any = causal.get_output_embeddings()
    losses: list[float] = []
    tokens = 0
    pm.train()
    step = 0
    idx: list[int] = []  # this epoch's batch order; ``pos``: where the next batch starts in it
    pos = 0
    spent = 0.0  # seconds of earlier runs this one resumes
    named = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    ckpt = Path(checkpoint) if checkpoint is not None else None
    ident = {"key": checkpoint_key, "recipe": dataclasses.asdict(recipe) | {"threads": None},
             "data": hashlib.sha256(json.dumps(encoded).encode()).hexdigest(),
             "micro_batch": micro}  # fmt: skip
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        if state.get("ident") != ident:
            log(f"train: {ckpt} is another training's checkpoint; starting over")
        else:
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(state["params"][n])
            opt.load_state_dict(state["opt"])
            step, losses, tokens = state["step"], list(state["losses"]), state["tokens"]
            idx, pos, spent = list(state["idx"]), state["pos"], state["seconds"]
            order_rng.setstate(_tuples(state["order_rng"]))
            random.setstate(_tuples(state["random"]))
            torch.set_rng_state(state["torch_rng"])
            log(f"train: resumed from {ckpt} at step {step}/{total}")
    saved_at = time.perf_counter()
    log(f"train: {len(encoded)} examples, {total} steps of {recipe.batch_size}, "
        f"{n_trainable / 1e6:.2f}M trainable parameters, {micro} rows per forward, base {base}")  # fmt: skip
    while step < total:
        if pos >= len(idx):  # a new epoch
            idx = list(range(len(encoded)))
            order_rng.shuffle(idx)
            pos = 0
        batch = [encoded[i] for i in idx[pos : pos + recipe.batch_size]]
        pos += recipe.batch_size
        for g in opt.param_groups:
            g["lr"] = recipe.lr * _schedule(step, total, recipe.warmup_steps)
        t0 = time.perf_counter()
        n_labels = sum(len(ids) - start for ids, start in batch)
        step_loss = 0.0
        for mb in range(0, len(batch), micro):
            part = batch[mb : mb + micro]
            input_ids, mask, rows, cols, labels = _collate(part, pad)
            hidden = body(input_ids=input_ids, attention_mask=mask).last_hidden_state
            logits = head(hidden[rows, cols]).float()
            # summed over the micro-batch, divided by the whole batch's count: the gradient
            # of the batch's mean loss, whatever the micro-batch size
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / n_labels
            loss.backward()
            step_loss += loss.item()
            tokens += int(mask.sum())
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(step_loss, 5))
        step += 1
        if step == 1 or step % 5 == 0 or step == total:
            el = spent + time.perf_counter() - t_start
            log(f"train: step {step}/{total} loss {losses[-1]:.4f} "
                f"({time.perf_counter() - t0:.1f} s/step, {el / 60:.1f} min)")  # fmt: skip
        if (ckpt is not None and step < total
                and time.perf_counter() - saved_at >= checkpoint_every):  # fmt: skip
            state = {"ident": ident, "params": {n: p.detach().clone() for n, p in named.items()},
                     "opt": opt.state_dict(), "step": step, "losses": losses,
                     "tokens": tokens, "idx": idx, "pos": pos,
                     "seconds": spent + time.perf_counter() - t_start,
                     "order_rng": order_rng.getstate(), "random": random.getstate(),
                     "torch_rng": torch.get_rng_state()}  # fmt: skip
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_name(ckpt.name + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, ckpt)  # a kill mid-write leaves the previous checkpoint whole
            saved_at = time.perf_counter()
            log(f"train: checkpoint at step {step}/{total} ({ckpt})")
    pm.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pm.save_pretrained(os.fspath(out))
    seconds = round(spent + time.perf_counter() - t_start, 1)
    adapter_file = out / "adapter_model.safetensors"
    manifest = {
        "format": "dlf_rs.real_family.adapter/1",
        "task": "vexil",
        "recipe": dataclasses.asdict(recipe),
        "target_modules": list(TARGET_MODULES),
        "examples": len(data),
        "data_sha256": prompts.dataset_digest(data),
        "base": os.fspath(base),
        "base_sha256": sha256_path(base) if Path(base).exists() else None,
        "adapter_sha256": sha256_path(adapter_file),
        "adapter_bytes": adapter_file.stat().st_size,
        "trainable_parameters": n_trainable,
        "micro_batch": micro,
        "steps": step,
        "tokens": tokens,
        "losses": losses,
        "seconds": seconds,
        "dtype": str(next(causal.parameters()).dtype).replace("torch.", ""),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with open(out / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    log(f"train: saved {out} ({adapter_file.stat().st_size / 1e6:.1f} MB) in {seconds} s; "
        f"final loss {losses[-1] if losses else float('nan')}")  # fmt: skip
    return manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Recipe()
    p.add_argument("--base", default="small", help="'small', 'large' or a model folder")
    p.add_argument("--out", help="adapter folder (default <cache>/adapters/vexil-<base>)")
    p.add_argument("--examples", type=int, default=d.examples)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="rows per forward (default: all below 1B parameters, else a quarter)",
    )
    p.add_argument("--force", action="store_true", help="train again even if the manifest matches")


def adapter_dir(cache: Path, base: str) -> Path:
    return cache / "adapters" / f"vexil-{base}"


def base_dir(cache: Path, base: str) -> Path:
    return cache / f"{base}-bf16" if base in ("small", "large") else Path(base)


def run(args: argparse.Namespace, cache: Path) -> None:
    recipe = Recipe(examples=args.examples, epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, rank=args.rank, lora_alpha=2 * args.rank, seed=args.seed,
                    max_steps=args.max_steps, threads=args.threads)  # fmt: skip
    base = base_dir(cache, args.base)
    out = Path(args.out) if args.out else adapter_dir(cache, args.base)
    have = out / MANIFEST
    if have.is_file() and not args.force:
        with open(have, encoding="utf-8") as fh:
            old = json.load(fh)
        if (
            old.get("recipe") == dataclasses.asdict(recipe)
            and (out / "adapter_model.safetensors").is_file()
        ):
            print(f"train: found {out} (same recipe, trained {old.get('created')} in "
                  f"{old.get('seconds')} s); nothing to do", flush=True)  # fmt: skip
            return
    train_adapter(
        base, out, recipe, log=lambda m: print(m, flush=True), micro_batch=args.micro_batch
    )
