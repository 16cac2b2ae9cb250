"""The real family's task: short programs against a fictional library (vexil), checked by running.

Where it sits: generates the training set of the expert (:mod:`.train`) and the held-out set of
the evaluation (:mod:`.evaluate`), renders their chat messages, pulls the code out of a model's
reply and checks it in the sandbox (:mod:`.sandbox`).

The task. Each example asks for ``solve(r)``, where ``r`` is a ``vexil.Run`` (the library in
``library/vexil.py``: a run of values that is not iterable and has no length, used only through
methods with made-up names: ``sift``, ``morph``, ``head``, ``skip``, ``turn``, ``order``,
``distinct``, then ``fold``, ``weigh``, ``peak``, ``base``, ``glue``, ``bag``). The prompt says
what to compute in plain words and never names a method, so a model that has not been taught
the API cannot write a working answer; the reference answer is one line
``return r.<steps>.<finisher>()``, a few tens of tokens.

What fine-tuning teaches and what it does not. The training split draws its conditions and
transforms (the lambdas) from pool "A" (even, greater than k, doubled, uppercased, ...); every
held-out example has exactly one from pool "B" (prime, digit sum, palindrome, capitalised, ...),
never seen in training. So the held-out set needs the API (from the expert) and ordinary Python
written from a description (general skill, where the large model is stronger).

Checking: the candidate runs on four inputs drawn with the example (lists of 0-9 values);
every ``repr`` of its result must equal the reference's. Each check is one sandboxed process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .library import LIBRARY_DIR
from .sandbox import run_program

__all__ = ["Example", "check", "extract_code", "make_split", "messages", "target_text"]

SYSTEM = "You are a Python coding assistant."
INPUTS_PER_EXAMPLE = 4

_WORD_TEXT = (
    "apple anna bob level river stone tree moon civic kayak otter garden piano zebra lemon "
    "noon radar sky crypt rhythm banana orange ocean eagle wolf deer pasta tomato cabbage "
    "refer madam tulip cactus mango peach grape olive sugar salt pepper honey bread cheese "
    "hello world python vexil spoon fork knife table chair sofa lamp book paper pen ink boat"
)
WORDS = tuple(_WORD_TEXT.split())

# (phrase, lambda body in x or w, pool). {k}: an int drawn per example.
INT_CONDS = [
    ("that are even", "x % 2 == 0", "A"),
    ("that are odd", "x % 2 == 1", "A"),
    ("that are positive", "x > 0", "A"),
    ("that are negative", "x < 0", "A"),
    ("greater than {k}", "x > {k}", "A"),
    ("less than {k}", "x < {k}", "A"),
    ("that are at least {k}", "x >= {k}", "A"),
    ("divisible by {m}", "x % {m} == 0", "A"),
    ("that are prime", "x > 1 and all(x % d for d in range(2, int(x ** 0.5) + 1))", "B"),
    ("that are perfect squares", "x >= 0 and int(x ** 0.5) ** 2 == x", "B"),
    ("whose last digit is {d}", "abs(x) % 10 == {d}", "B"),
    ("between {k} and {k2} inclusive", "{k} <= x <= {k2}", "B"),
    ("whose digit sum is even", "sum(int(c) for c in str(abs(x))) % 2 == 0", "B"),
    ("not divisible by {m}", "x % {m} != 0", "B"),
    ("with exactly two digits", "10 <= abs(x) <= 99", "B"),
]
# Transforms: the whole clause ({one}: "value" or "word").
INT_MAPS = [
    ("double each {one}", "x * 2", "A"),
    ("square each {one}", "x * x", "A"),
    ("increase each {one} by {k}", "x + {k}", "A"),
    ("decrease each {one} by {k}", "x - {k}", "A"),
    ("negate each {one}", "-x", "A"),
    ("replace each {one} by its absolute value", "abs(x)", "B"),
    ("cube each {one}", "x ** 3", "B"),
    ("replace each {one} by its remainder modulo {m}", "x % {m}", "B"),
    ("replace each {one} by its last digit", "abs(x) % 10", "B"),
    ("replace each {one} by the number of its digits", "len(str(abs(x)))", "B"),
    ("halve each {one}, rounding down", "x // 2", "B"),
]
WORD_CONDS = [
    ("longer than {n} letters", "len(w) > {n}", "A"),
    ("shorter than {n} letters", "len(w) < {n}", "A"),
    ("starting with '{c}'", "w.startswith('{c}')", "A"),
    ("ending with '{c}'", "w.endswith('{c}')", "A"),
    ("containing '{c}'", "'{c}' in w", "A"),
    ("that are palindromes", "w == w[::-1]", "B"),
    ("with no vowels", "not any(c in 'aeiou' for c in w)", "B"),
    ("that start and end with the same letter", "w[0] == w[-1]", "B"),
    ("of even length", "len(w) % 2 == 0", "B"),
    ("containing a doubled letter", "any(a == b for a, b in zip(w, w[1:]))", "B"),
    ("with at least three vowels", "sum(c in 'aeiou' for c in w) >= 3", "B"),
]
WORD_MAPS = [
    ("uppercase each {one}", "w.upper()", "A"),
    ("reverse each {one}", "w[::-1]", "A"),
    ("replace each {one} by its length", "len(w)", "A"),
    ("replace each {one} by its first letter", "w[0]", "A"),
    ("capitalize each {one}", "w.capitalize()", "B"),
    ("replace each {one} by its last two letters", "w[-2:]", "B"),
    ("in each {one}, replace every 'a' by '@'", "w.replace('a', '@')", "B"),
    ("replace each {one} by its number of vowels", "sum(c in 'aeiou' for c in w)", "B"),
    ("repeat each {one} twice", "w * 2", "B"),
]


@dataclass(frozen=True)
class Example:
    """One task instance: the request, the reference answer and the checked inputs/outputs."""

    id: str
    split: str
    prompt: str
    answer: str  # the reference program (def solve(r): ...)
    inputs: tuple[tuple[Any, ...], ...]
    expected: tuple[str, ...]  # repr of the reference result on each input
    pool_b: str  # the held-out phrase used ("" in training)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Example:
        return cls(**{**d, "inputs": tuple(tuple(x) for x in d["inputs"]),
                      "expected": tuple(d["expected"])})  # fmt: skip


def _vexil() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dlf_vexil", LIBRARY_DIR / "vexil.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fill(template: str, params: dict[str, Any]) -> str:
    return template.format(**params)


def _draw_params(rng: random.Random) -> dict[str, Any]:
    k = rng.randint(-5, 20)
    return {"k": k, "k2": k + rng.randint(5, 25), "m": rng.choice([3, 4, 5, 7]),
            "d": rng.randint(0, 9), "n": rng.randint(3, 6),
            "c": rng.choice("abeilmnoprst")}  # fmt: skip


def _step_pool(kind: str) -> list[str]:
    common = ["sift", "morph", "head", "skip", "turn", "order", "distinct"]
    return common + (["order_len"] if kind == "words" else [])


def _finishers(kind: str, last_morph_numeric: bool) -> list[str]:
    if kind == "ints" or last_morph_numeric:
        return ["fold", "weigh", "peak", "base", "glue", "bag"]
    return ["weigh", "peak", "base", "glue", "bag"]


def _compose(rng: random.Random, split: str) -> tuple[str, str, str] | None:
    """One (prompt, answer, pool-B phrase) or None when the draw is not usable."""
    kind = rng.choice(["ints", "words"])
    noun = "values" if kind == "ints" else "words"
    var = "x" if kind == "ints" else "w"
    n_steps = rng.choice([1, 2, 2, 3])
    steps = [rng.choice(_step_pool(kind)) for _ in range(n_steps)]
    if split == "heldout" and not {"sift", "morph"} & set(steps):
        steps[rng.randrange(n_steps)] = rng.choice(["sift", "morph"])
    if len(set(steps)) != len(steps):
        return None
    # which lambda-bearing step gets the held-out (pool B) phrase
    lam_steps = [i for i, s in enumerate(steps) if s in ("sift", "morph")]
    b_at = rng.choice(lam_steps) if split == "heldout" else -1
    clauses, calls, b_phrase = [], [], ""
    numeric = kind == "ints"
    kind_now = kind
    for i, step in enumerate(steps):
        p = _draw_params(rng)
        pool = "B" if i == b_at else "A"
        if step == "sift":
            table = INT_CONDS if kind_now == "ints" else WORD_CONDS
            phrase, body, _ = rng.choice([t for t in table if t[2] == pool])
            clauses.append(f"keep the {noun} {_fill(phrase, p)}")
            calls.append(f"sift(lambda {var}: {_fill(body, p)})")
        elif step == "morph":
            table = INT_MAPS if kind_now == "ints" else WORD_MAPS
            phrase, body, _ = rng.choice([t for t in table if t[2] == pool])
            one = "value" if kind_now == "ints" else "word"
            clauses.append(_fill(phrase, {**p, "one": one}))
            calls.append(f"morph(lambda {var}: {_fill(body, p)})")
            if kind_now == "words":
                numeric = body.startswith(("len", "sum"))
                kind_now = "ints" if numeric else "words"
                noun = "values" if numeric else "words"
                var = "x" if numeric else "w"
        elif step == "head":
            clauses.append(f"take the first {p['n']}")
            calls.append(f"head({p['n']})")
        elif step == "skip":
            clauses.append(f"drop the first {p['n'] - 2}")
            calls.append(f"skip({p['n'] - 2})")
        elif step == "turn":
            clauses.append("reverse their order")
            calls.append("turn()")
        elif step == "order":
            clauses.append("sort them in ascending order")
            calls.append("order()")
        elif step == "order_len":
            if kind_now != "words":
                return None
            clauses.append("sort them by length (shortest first, ties keep their order)")
            calls.append("order(key=len)")
        elif step == "distinct":
            clauses.append("remove repeats, keeping the first of each")
            calls.append("distinct()")
        if pool == "B":
            b_phrase = _fill(phrase, {**p, "one": "value"})
    fin = rng.choice(_finishers(kind_now, numeric))
    sep = rng.choice([",", "-", " ", ";"])
    fin_text = {
        "fold": ("return their sum", "fold()"),
        "weigh": ("return how many there are", "weigh()"),
        "peak": ("return the largest" if kind_now == "ints" else "return the largest "
                 "(alphabetically last)", "peak()"),
        "base": ("return the smallest" if kind_now == "ints" else "return the smallest "
                 "(alphabetically first)", "base()"),
        "glue": (f"return them joined into one string with {sep!r} between them", f"glue({sep!r})"),
        "bag": ("return them as a list", "bag()"),
    }[fin]  # fmt: skip
    clauses.append(fin_text[0])
    calls.append(fin_text[1])
    what = "integers" if kind == "ints" else "lowercase words"
    text = ", then ".join(clauses)
    prompt = (f"Using the vexil library, write a Python function `solve(r)` where `r` is a "
              f"`vexil.Run` of {what}: {text}. Reply with only the code.")  # fmt: skip
    answer = "def solve(r):\n    return r." + ".".join(calls) + "\n"
    return prompt, answer, b_phrase


def _inputs(rng: random.Random, kind: str) -> tuple[Any, ...]:
    n = rng.randint(0, 9)
    if kind == "ints":
        return tuple(rng.randint(-20, 40) for _ in range(n))
    return tuple(rng.choice(WORDS) for _ in range(n))


def _reference(answer: str, vexil: Any) -> Callable[[Any], Any]:
    ns: dict[str, Any] = {}
    exec(answer, ns)  # noqa: S102 - our own reference program, never a model's output
    fn = ns["solve"]
    return lambda values: fn(vexil.Run(values))


def _example(rng: random.Random, split: str, index: int, vexil: Any) -> Example | None:
    drawn = _compose(rng, split)
    if drawn is None:
        return None
    prompt, answer, b_phrase = drawn
    kind = "ints" if "of integers" in prompt else "words"
    ref = _reference(answer, vexil)
    inputs: list[tuple[Any, ...]] = []
    outs: list[str] = []
    for _ in range(40):
        values = _inputs(rng, kind)
        try:
            out = ref(values)
        except Exception:  # noqa: BLE001, S112 - e.g. peak() of an empty run: other inputs
            continue
        inputs.append(values)
        outs.append(repr(out))
        if len(inputs) == INPUTS_PER_EXAMPLE:
            break
    # An example must be decided by its inputs: at least two different results.
    if len(inputs) < INPUTS_PER_EXAMPLE or len(set(outs)) < 2:
        return None
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:10]
    return Example(f"{split}-{index:04d}-{digest}", split, prompt, answer, tuple(inputs),
                   tuple(outs), b_phrase)  # fmt: skip


def make_split(split: str, n: int, seed: int) -> list[Example]:
    """``n`` examples of ``split`` ("train" or "heldout"), a function of ``(split, n, seed)``
    only; no prompt repeats within a split, and the held-out prompts are never training ones
    (each has a pool-B phrase, which training never uses)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"vexil/{split}/{seed}")
    vexil = _vexil()
    out: list[Example] = []
    seen: set[str] = set()
    while len(out) < n:
        ex = _example(rng, split, len(out), vexil)
        if ex is None or ex.prompt in seen:
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


def messages(ex: Example | str) -> list[dict[str, str]]:
    """The chat conversation every model reads (each renders it with its own chat template)."""
    prompt = ex if isinstance(ex, str) else ex.prompt
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def target_text(ex: Example) -> str:
    """The assistant reply the expert is trained to give (generation stops at the fence)."""
    return "```python\n" + ex.answer + "```"


_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(reply: str) -> str:
    """The code in a model's reply: the first fenced block (closed or cut off), else the reply."""
    m = _FENCE.search(reply)
    return m.group(1) if m else reply


_HARNESS = """
import json as _json
import vexil as _vexil
_out = []
for _values in _json.loads({inputs!r}):
    try:
        _out.append(repr(solve(_vexil.Run(_values))))
    except BaseException as _e:  # noqa
        _out.append("!" + type(_e).__name__)
print("@@RESULT@@" + _json.dumps(_out))
"""


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str  # "ok", "wrong", "error", "timeout", "no-solve"


def check(ex: Example, reply: str, timeout: float = 5.0) -> Verdict:
    """Run the code of ``reply`` on the example's inputs in the sandbox; passed when every
    result's ``repr`` equals the reference's."""
    code = extract_code(reply)
    if "def solve" not in code:
        return Verdict(False, "no-solve")
    program = code + "\n" + _HARNESS.format(inputs=json.dumps([list(v) for v in ex.inputs]))
    res = run_program(program, timeout, python_path=[LIBRARY_DIR])
    if res.status == "timeout":
        return Verdict(False, "timeout")
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("@@RESULT@@")), None)
    if line is None:
        return Verdict(False, "error")
    got = json.loads(line[len("@@RESULT@@") :])
    return Verdict(got == list(ex.expected), "ok" if got == list(ex.expected) else "wrong")


def dataset_digest(examples: Sequence[Example]) -> str:
    """sha256 of the examples as canonical JSON (the training manifest records it)."""
    blob = json.dumps([e.to_json() for e in examples], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
