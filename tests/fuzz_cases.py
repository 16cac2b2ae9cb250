"""Fuzz cases for the public API as plain data (JSON), shared by tests/test_fuzz.py (hypothesis)
and benches/fuzz.py (the long seeded run).

A case is a dict: which function (`fuse_step`, `fuse_logits`, `sample`), the shapes (B rows, V
tokens, T experts), how the logits are made (a data seed, a scale, -inf patterns, NaN/+inf
entries), how they are passed (dtype, numpy or torch, layout, experts as a [T, B, V] array or a
list) and the keyword arguments as Python source text (`"2**64"`, `"float('nan')"`,
`"np.array(1j)"`), so that a case prints as its own reproducer and travels to a worker process as
JSON. `gen_case` draws a case through a `Drawer`: hypothesis draws (which shrink) or a seeded
`random.Random` (the long run), one generator for both.

Over 500 lines: one generator of cases for both the hypothesis tests and the long run, kept
in one place so the two cover the same space.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
from dlf_rs.reference import zipf_logits

MAX_GRID_POINTS = 10_001  # README.md, "Options": at most 10,001 grid points on the alpha range
ORACLE_BUDGET = 2_000_000  # grid points x experts x rows x vocab the oracle scans per case


class Drawer:
    """The choices a case is made of. Options are listed simplest first (hypothesis shrinks to
    the first)."""

    def int(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def choice(self, options: list[Any]) -> Any:
        return options[self.int(0, len(options) - 1)]

    def maybe(self, p: float) -> bool:
        """True with probability p; shrinks to False."""
        return self.int(0, 999) >= round(1000 * (1.0 - p))


class RandomDrawer(Drawer):
    def __init__(self, rng: random.Random):
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


def case_rng(seed: int, index: int) -> random.Random:
    """The generator of case `index` of a run seeded with `seed` (each case replays alone)."""
    return random.Random(f"dlf-fuzz/{seed}/{index}")


# Keyword values as source text. "ok": valid by the rules (README.md, "Options"); "odd": wrong type or value (or a value
# the rules leave open; the oracle decides which).
TEMPERATURE = {
    "ok": [
        "0",
        "0.0",
        "1.0",
        "0.7",
        "2.5",
        "1",
        "1e-3",
        "1e-30",
        "5e-324",
        "1e-310",
        "1e30",
        "1e300",
        "np.float32(0.5)",
        "np.float64(1.5)",
        "np.int64(2)",
        "-0.0",
    ],
    "odd": [
        "-1.0",
        "float('nan')",
        "float('inf')",
        "float('-inf')",
        "True",
        "'1.0'",
        "[1.0]",
        "1j",
        "np.array(1.0)",
        "2**1100",
        "None",
        "np.float32('nan')",
        "-5e-324",
    ],
}
TOP_K = {
    "ok": [
        "0",
        "1",
        "2",
        "5",
        "{V}",
        "{V} + 7",
        "2**31",
        "2**63 - 1",
        "np.int64(3)",
        "np.uint64(2**63 - 1)",
        "np.int8(1)",
    ],
    "odd": [
        "-1",
        "2**63",
        "2**64",
        "2**100",
        "2.0",
        "2.7",
        "True",
        "'3'",
        "None",
        "-2**70",
        "np.float64(3.0)",
        "[3]",
    ],
}
TOP_P = {
    "ok": ["1.0", "1", "0.5", "0.9", "0.999999", "1e-300", "5e-324", "np.float32(0.3)", "0.25"],
    "odd": [
        "0",
        "0.0",
        "-0.1",
        "1.0000001",
        "float('nan')",
        "float('inf')",
        "True",
        "'0.5'",
        "2**70",
        "None",
    ],
}
MIN_P = {
    "ok": ["0.0", "0", "0.1", "0.5", "1.0", "1", "5e-324", "np.float64(0.05)"],
    "odd": ["-0.1", "1.5", "float('nan')", "float('inf')", "True", "'0.1'", "-5e-324", "None"],
}
SEED_OK = [
    "None",
    "0",
    "1",
    "12345",
    "2**63",
    "2**64 - 1",
    "np.int64(5)",
    "np.uint64(2**64 - 1)",
    "{rows}",
    "tuple({rows})",
    "np.array({rows}, dtype=np.uint64)",
]
SEED_ODD = [
    "-1",
    "2**64",
    "2**100",
    "1.5",
    "1.0",
    "True",
    "'ab'",
    "{short}",
    "{neg_elem}",
    "{float_elem}",
    "{bool_elem}",
    "{str_elem}",
    "{big_elem}",
    "np.zeros((2, 2), np.int64)",
    "-2**63",
    "np.int64(-3)",
    "b'ab'",
]
SUPPORT_K = {
    "ok": ["None", "1", "2", "8", "{V}", "{V} + 5", "2**63 - 1", "np.int64(4)"],
    "odd": ["0", "-1", "2**63", "2**64", "2.0", "2.5", "True", "'4'", "np.float32(4.0)"],
}
SOLVER = {"ok": ["'grid'", "'exact'"], "odd": ["'newton'", "''", "None", "1", "'GRID'"]}
MULTI = {"ok": ["'one-active'", "'joint'", "'own-terms'", "'max-shift'"], "odd": ["'all'", "'Joint'", "None", "3"]}
# (alpha_range, grid_step) pairs: the range decides the grid's cost, so they are drawn together.
RANGE_STEP_OK = [
    ("(0.0, 2.0)", "0.1"),
    ("(0, 2)", "0.1"),
    ("[0.0, 1.0]", "0.05"),
    ("(-1.0, 1.0)", "0.1"),
    ("(0.5, 0.5)", "0.1"),
    ("(0.0, 0.0)", "0.1"),
    ("(1.5, 2.0)", "0.5"),
    ("(-100, -99)", "0.25"),
    ("(99.5, 100)", "0.1"),
    ("(-100, 100)", "0.02"),
    ("(-100, 100)", "7.0"),
    ("(0.0, 2.0)", "3.0"),
    ("(0.0, 2.0)", "1e300"),
    ("(0.0, 1e-300)", "0.1"),
    ("(np.float32(0), np.float64(2))", "0.1"),
    ("(0.0, 2.0)", "np.float32(0.1)"),
    ("(-2.5, 0.0)", "0.125"),
    ("(0, 100)", "0.01"),
    ("(0.0, 2.0)", "2e-4"),
]
RANGE_ODD = [
    "(2.0, 0.0)",
    "(float('nan'), 1.0)",
    "(0.0, float('inf'))",
    "(-1e300, -1e300)",
    "(-100.5, 0.0)",
    "(0.0, 101)",
    "'ab'",
    "(0.0, 1.0, 2.0)",
    "2.0",
    "(True, 2.0)",
    "(0.0, '1')",
    "None",
    "(1e39, 1e39)",
    "(0.0, 1j)",
    "np.array([0.0, 2.0])",
]
STEP_ODD = [
    "0",
    "0.0",
    "-0.1",
    "float('nan')",
    "float('inf')",
    "True",
    "'0.1'",
    "1e-12",
    "1.9e-4",
    "None",
    "5e-324",
]
ALPHA_OK = [
    "None",
    "1.0",
    "0.5",
    "-2.0",
    "100",
    "-100",
    "1e-310",
    "np.float32(1.0)",
    "{list}",
    "tuple({list})",
    "np.array({list})",
    "0",
]
ALPHA_ODD = [
    "100.5",
    "-1e3",
    "1e300",
    "1e39",
    "float('nan')",
    "float('inf')",
    "{long}",
    "{nan_elem}",
    "True",
    "'1.0'",
    "np.array(1j)",
    "{str_elem}",
    "np.ones((2, 2))",
    "np.array(1.0)",
    "{bool_elem}",
    "[]",
    "1j",
    "{big_elem}",
]
ALPHAS_OK = [
    "{list}",
    "np.array({list}, np.float32)",
    "{rows}",
    "{rows_f64}",
    "{torch}",
    "{scalar}",
]
ALPHAS_ODD = [
    "{long}",
    "{nan_elem}",
    "'x'",
    "{big_elem}",
    "{rows_bad}",
    "None",
    "{inf_elem}",
    "{f32max_elem}",
]

SAMPLING = ("temperature", "top_k", "top_p", "min_p", "seed")
STEP_ONLY = ("alpha", "alpha_range", "grid_step", "solver", "multi_expert", "support_k")


def _floats(d: Drawer, n: int, hard: bool = False) -> list[float]:
    pool = ["0.0", "0.5", "1.0", "1.5", "-0.5", "2.0"] + (
        ["100.0", "-100.0", "1e-310"] if hard else []
    )
    return [float(d.choice(pool)) for _ in range(n)]


def _seed_kw(d: Drawer, b: int, odd: bool) -> str:
    src = d.choice(SEED_ODD if odd else SEED_OK)
    rows = [d.choice([0, 1, 7, 2**63, 2**64 - 1]) for _ in range(b)]
    i = d.int(0, max(b - 1, 0))

    def with_elem(x: str) -> str:
        if b == 0:
            return "[" + x + "]"
        elems = [str(r) for r in rows]
        elems[i] = x
        return "[" + ", ".join(elems) + "]"

    return src.format(
        rows=repr(rows),
        short=repr(rows[:-1] if b else [1]),
        neg_elem=with_elem("-3"),
        float_elem=with_elem("1.5"),
        bool_elem=with_elem("True"),
        str_elem=with_elem("'x'"),
        big_elem=with_elem("2**64"),
    )


def _alpha_kw(d: Drawer, t: int, odd: bool) -> str:
    src = d.choice(ALPHA_ODD if odd else ALPHA_OK)
    vals = _floats(d, t, hard=True)
    i = d.int(0, max(t - 1, 0))

    def with_elem(x: str) -> str:
        elems = [repr(v) for v in vals] or ["1.0"]
        elems[min(i, len(elems) - 1)] = x
        return "[" + ", ".join(elems) + "]"

    return src.format(
        list=repr(vals),
        long=repr(vals + [1.0]),
        nan_elem=with_elem("float('nan')"),
        str_elem=with_elem("'x'"),
        bool_elem=with_elem("True"),
        big_elem=with_elem("1e300"),
    )


def _alphas_kw(d: Drawer, b: int, t: int, odd: bool) -> str:
    src = d.choice(ALPHAS_ODD if odd else ALPHAS_OK)
    vals = _floats(d, t)
    rows = [_floats(d, t) for _ in range(b)]
    i = d.int(0, max(t - 1, 0))

    def with_elem(x: str) -> str:
        elems = [repr(v) for v in vals] or ["1.0"]
        elems[min(i, len(elems) - 1)] = x
        return "[" + ", ".join(elems) + "]"

    if src == "{scalar}" and t != 1:
        src = "{list}"
    return src.format(
        list=repr(vals),
        rows=f"np.array({rows!r}, np.float32).reshape({b}, {t})",
        rows_f64=f"np.array({rows!r}, np.float64).reshape({b}, {t})",
        rows_bad=f"np.ones(({b + 1}, {t}), np.float32)",
        torch=f"torch.tensor({vals!r}, dtype=torch.float32)",
        scalar=repr(vals[0]) if vals else "1.0",
        long=repr(vals + [1.0]),
        nan_elem=with_elem("float('nan')"),
        inf_elem=with_elem("float('-inf')"),
        big_elem=with_elem("1e300"),
        f32max_elem=with_elem("3.5e38"),
    )


def _grid_points(range_src: str, step_src: str) -> int:
    """Grid size of a valid (range, step) pair, by the reference's formula; 0 if not valid."""
    try:
        lo, hi = (float(x) for x in eval(range_src, {"np": np}))
        step = float(eval(step_src, {"np": np}))
    except (TypeError, ValueError, SyntaxError, ZeroDivisionError):
        return 0
    n = (hi - lo) / step + 1e-9 if step > 0 else np.nan
    if not (np.isfinite([lo, hi, step, n]).all() and lo <= hi):
        return 0
    return int(np.floor(n)) + 1


def gen_case(d: Drawer, fn: str | None = None) -> dict[str, Any]:
    """Draw one case. Mostly valid calls (so that results get checked), a share of odd ones."""
    if fn is None:
        fn = d.choice(["fuse_step", "fuse_step", "fuse_logits", "sample"])
    b = d.int(0, 6)
    v = d.int(1, 16) if d.maybe(0.5) else d.int(17, 300)
    t = 0 if fn != "sample" and d.maybe(0.03) else d.int(1, 4)
    if fn == "sample":
        t = 0
    case: dict[str, Any] = {
        "fn": fn,
        "B": b,
        "V": v,
        "T": t,
        "data_seed": d.int(0, 2**32 - 1),
        "scale": d.choice(
            ["zipf", "normal", "ties", "huge", "tiny", "subnormal", "const", "mixed"]
        ),
        "ninf_large": d.choice([0.0, 0.1, 0.5, 0.95]) if d.maybe(0.3) else 0.0,
        "ninf_other": d.choice([0.1, 0.5, 1.0]) if d.maybe(0.2) else 0.0,
        "dtype": d.choice(["f32", "f16", "f64", ">f4", "bf16"]) if d.maybe(0.4) else "f32",
        "container": d.choice(["numpy", "torch"]),
        "layout": d.choice(["c", "T", "slice", "F", "rev", "ro"]) if d.maybe(0.4) else "c",
        "experts_form": d.choice(["array", "list", "tuple"]),
        "specials": [],
        "neg_rows": [],
        "bad_input": None,
        "kwargs": {},
    }
    names = (
        ["logits"] if fn == "sample" else ["large", "small"] + [f"experts[{i}]" for i in range(t)]
    )
    if b > 0 and d.maybe(0.12):
        for _ in range(d.int(1, 2)):
            case["specials"].append(
                [d.choice(names), d.int(0, b - 1), d.int(0, v - 1), d.choice(["nan", "inf"])]
            )
    if b > 0 and d.maybe(0.08):
        case["neg_rows"].append([d.choice(names), d.int(0, b - 1)])
    if d.maybe(0.12):
        kind = d.choice(
            [
                "i64",
                "bool",
                "c64",
                "u8",
                "list",
                "str",
                "sparse",
                "none",
                "0d",
                "1d",
                "3d",
                "rows+1",
                "vocab-1",
                "float",
                "torch_i32",
                "meta",
            ]
        )
        if fn == "sample" and kind in ("rows+1", "vocab-1"):
            kind = "1d"  # one array alone cannot mismatch
        case["bad_input"] = [d.choice(names + (["experts"] if t and fn != "sample" else [])), kind]

    kw = case["kwargs"]
    odd_p = 0.25
    if fn in ("fuse_step", "sample"):
        for name, pools in (
            ("temperature", TEMPERATURE),
            ("top_k", TOP_K),
            ("top_p", TOP_P),
            ("min_p", MIN_P),
        ):
            if d.maybe(0.35):
                kw[name] = d.choice(pools["odd" if d.maybe(odd_p) else "ok"]).format(V=v)
        if d.maybe(0.4):
            kw["seed"] = _seed_kw(d, b, d.maybe(odd_p))
    if fn == "fuse_step":
        if d.maybe(0.25):
            kw["alpha"] = _alpha_kw(d, t, d.maybe(odd_p))
        if d.maybe(0.4):
            rng_src, step_src = d.choice(RANGE_STEP_OK)
            if d.maybe(odd_p):
                rng_src = d.choice(RANGE_ODD)
            if d.maybe(odd_p):
                step_src = d.choice(STEP_ODD)
            kw["alpha_range"], kw["grid_step"] = rng_src, step_src
        for name, pools in (("solver", SOLVER), ("multi_expert", MULTI), ("support_k", SUPPORT_K)):
            if d.maybe(0.25):
                kw[name] = d.choice(pools["odd" if d.maybe(odd_p) else "ok"]).format(V=v)
        # Keep the oracle's scan affordable: a long grid gets a small problem.
        n = _grid_points(kw.get("alpha_range", "(0.0, 2.0)"), kw.get("grid_step", "0.1"))
        if n > 0 and n <= MAX_GRID_POINTS and n * max(t, 1) * max(b, 1) * v > ORACLE_BUDGET:
            case["V"] = v = max(1, ORACLE_BUDGET // (n * max(t, 1) * max(b, 1)))
            case["specials"] = [s for s in case["specials"] if s[2] < v]
    if fn == "fuse_logits":
        case["alphas"] = _alphas_kw(d, b, t, d.maybe(odd_p))
    return case


# ---- building the call's arguments ------------------------------------------------------------


def _base_arrays(case: dict[str, Any]) -> dict[str, np.ndarray]:
    """float32 truth arrays before any dtype or container: {'large','small','experts'} or
    {'logits'}."""
    b, v, t = case["B"], case["V"], max(case["T"], 1)
    rng = np.random.default_rng(case["data_seed"])
    scale = case["scale"]
    if scale == "zipf":
        large, small, experts = zipf_logits(rng, b, v, t, n_perturbed=min(v, 40))
    else:
        large = rng.normal(0.0, 3.0, (b, v))
        small = large * rng.uniform(0.5, 1.5) + rng.normal(0.0, 1.0, (b, v))
        experts = small[None] + rng.normal(0.0, 1.0, (t, b, v)) * (rng.random((t, b, v)) < 0.3)
        factor = {
            "normal": 1.0,
            "huge": 1e30,
            "tiny": 1e-30,
            "subnormal": 1e-40,
            "const": 0.0,
            "ties": 1.0,
            "mixed": 1.0,
        }[scale]
        if scale == "ties":
            large, small, experts = (np.round(x / 3.0) for x in (large, small, experts))
        if scale == "mixed":
            rows = np.array([1e-40, 1.0, 1e30, 1e-30, 1e4, 0.0, 1e-3])[rng.integers(0, 7, b)]
            large, small, experts = (x * rows[:, None] for x in (large, small, experts))
        else:
            large, small, experts = (x * factor for x in (large, small, experts))
    arrs = {
        "large": np.asarray(large, np.float32),
        "small": np.asarray(small, np.float32),
        "experts": np.asarray(experts, np.float32)[: case["T"]],
    }
    if case["ninf_large"] > 0 and b:
        mask = rng.random((b, v)) < case["ninf_large"]
        keep = np.argmax(arrs["large"], axis=1)  # one finite token per row stays (most rows)
        mask[np.arange(b), keep] = False
        arrs["large"][mask] = -np.inf
    if case["ninf_other"] > 0 and b:
        for key in ("small", "experts"):
            mask = rng.random(arrs[key].shape) < case["ninf_other"] * 0.5
            arrs[key][mask] = -np.inf
    if case["fn"] == "sample":
        return {"logits": arrs["large"]}
    return arrs


def _get(arrs: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name.startswith("experts["):
        return arrs["experts"][int(name[8:-1])]
    return arrs[name]


def truth_arrays(case: dict[str, Any]) -> dict[str, np.ndarray]:
    """The float32 logits the core should see (after the special entries and the dtype
    conversion the caller's dtype implies)."""
    arrs = {k: x.copy() for k, x in _base_arrays(case).items()}
    for name, row, col, val in case["specials"]:
        _get(arrs, name)[row, col] = {"nan": np.nan, "inf": np.inf}[val]
    for name, row in case["neg_rows"]:
        _get(arrs, name)[row, :] = -np.inf
    dtype = case["dtype"]
    for k, x in arrs.items():
        if dtype == "f16":
            arrs[k] = x.astype(np.float16).astype(np.float32)
        elif dtype == "bf16" and case["container"] == "torch":
            import torch

            arrs[k] = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
        # f64 and >f4 hold the float32 values exactly.
    return arrs


def _numpy_dtype(case: dict[str, Any]) -> Any:
    return {
        "f32": np.float32,
        "f16": np.float16,
        "f64": np.float64,
        ">f4": np.dtype(">f4"),
        "bf16": np.float32,
    }[case["dtype"]]


def _layout(x: np.ndarray, layout: str) -> np.ndarray:
    """The same values in another memory layout (the last two axes)."""
    if layout == "T":
        return np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    if layout == "slice":
        wide = np.repeat(x, 2, axis=-1)
        return wide[..., ::2]
    if layout == "F":
        return np.asfortranarray(x)
    if layout == "rev":
        return np.ascontiguousarray(x[..., ::-1])[..., ::-1]
    if layout == "ro":
        y = x.copy()
        y.setflags(write=False)
        return y
    return x


def _container(x: np.ndarray, case: dict[str, Any]) -> Any:
    """Numpy array of the case's dtype and layout, or a torch tensor."""
    layout = case["layout"]
    if case["container"] == "torch":
        import torch

        dt = {
            "f32": torch.float32,
            "f16": torch.float16,
            "f64": torch.float64,
            ">f4": torch.float32,
            "bf16": torch.bfloat16,
        }[case["dtype"]]
        if layout == "T":
            return (
                torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, -1, -2)))
                .to(dt)
                .transpose(-1, -2)
            )
        if layout == "slice":
            return torch.from_numpy(np.repeat(x, 2, axis=-1)).to(dt)[..., ::2]
        ten = torch.from_numpy(np.ascontiguousarray(x)).to(dt)
        return ten.requires_grad_() if layout == "ro" and ten.is_floating_point() else ten
    return _layout(x.astype(_numpy_dtype(case)), layout)


def _bad(x: np.ndarray, kind: str, case: dict[str, Any]) -> Any:
    """An input of a kind the API must refuse (or, for lists, may accept)."""
    if kind in ("i64", "bool", "c64", "u8"):
        dt = {"i64": np.int64, "bool": np.bool_, "c64": np.complex64, "u8": np.uint8}[kind]
        with np.errstate(invalid="ignore", over="ignore"):
            return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).clip(-1e6, 1e6).astype(dt)
    if kind == "list":
        return x.tolist()
    if kind == "str":
        return "logits"
    if kind == "none":
        return None
    if kind == "float":
        return 1.5
    if kind == "0d":
        return np.array(1.0, np.float32)
    if kind == "1d":
        return x.reshape(-1)
    if kind == "3d":
        return x[None]
    if kind == "rows+1":
        return np.concatenate([x, x[..., :1, :]], axis=-2) if x.ndim >= 2 else x
    if kind == "vocab-1":
        return x[..., :-1]
    import torch

    if kind == "sparse":
        return torch.from_numpy(np.nan_to_num(x, neginf=-1e30)).to_sparse()
    if kind == "torch_i32":
        return torch.zeros(x.shape, dtype=torch.int32)
    if kind == "meta":
        return torch.empty(x.shape, device="meta")
    raise ValueError(kind)


def eval_src(src: str, case: dict[str, Any] | None = None) -> Any:
    """A keyword value from its source text."""
    ns: dict[str, Any] = {"np": np}
    if "torch" in src:
        import torch

        ns["torch"] = torch
    return eval(src, ns)


def build_call(case: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments of the case's call."""
    arrs = truth_arrays(case)
    bad = case["bad_input"]

    def wrap(name: str, x: np.ndarray) -> Any:
        if bad and bad[0] == name:
            return _bad(x, bad[1], case)
        return _container(x, case)

    kwargs = {k: eval_src(s) for k, s in case["kwargs"].items()}
    if case["fn"] == "sample":
        return [wrap("logits", arrs["logits"])], kwargs
    large, small = wrap("large", arrs["large"]), wrap("small", arrs["small"])
    ex = arrs["experts"]
    if case["experts_form"] == "array" and not (bad and bad[0].startswith("experts[")):
        experts = wrap("experts", ex)
    else:
        experts = [wrap(f"experts[{i}]", ex[i]) for i in range(ex.shape[0])]
        if case["experts_form"] == "tuple":
            experts = tuple(experts)
        if bad and bad[0] == "experts":
            experts = _bad(ex, bad[1], case)
    args = [large, small, experts]
    if case["fn"] == "fuse_logits":
        args.append(eval_src(case["alphas"]))
    return args, kwargs


def describe(case: dict[str, Any]) -> str:
    """One line: the call in words plus the JSON that replays it."""
    kw = ", ".join(f"{k}={s}" for k, s in case["kwargs"].items())
    extra = f", alphas={case['alphas']}" if case["fn"] == "fuse_logits" else ""
    return (
        f"{case['fn']}(B={case['B']}, V={case['V']}, T={case['T']}, scale={case['scale']}, "
        f"dtype={case['dtype']}, {case['container']}/{case['layout']}/"
        f"{case['experts_form']}, specials={case['specials']}, neg_rows={case['neg_rows']}, "
        f"bad_input={case['bad_input']}{extra}{', ' if kw else ''}{kw})  "
        f"replay: {json.dumps(case, separators=(',', ':'))}"
    )
