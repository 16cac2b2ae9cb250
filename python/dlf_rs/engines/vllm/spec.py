"""The fused model directory and the per-request options (no vLLM import: the main venv tests it).

A fused model is a directory vLLM can be pointed at (``LLM(dir)``, ``vllm serve dir``):

- ``config.json``: the large model's own config, with ``architectures`` set to
  ``["DlfFusedForCausalLM"]`` (the class :mod:`dlf_rs.engines.vllm.model` registers) and a
  ``"dlf_rs"`` section: ``{"format": "dlf_rs.fused/1", "large": ..., "small": ..., "experts":
  [...], "options": {...}}``. Members are local paths (relative ones are relative to the
  directory) or hub ids, resolved with the same rules as ``from_pretrained`` (the hub's cache
  only, unless ``local_files_only=False`` was given when the directory was built).
  ``options`` are the directory's default :class:`~dlf_rs.StepOptions` fields for fusion
  (method, alpha, expert, alpha_range, grid_step, solver, multi_expert, support_k).
- the large model's tokenizer and generation config (vLLM's frontend reads them from here),
- ``dlf_rs_fused.safetensors``: one marker tensor, so that vLLM's default loader finds a
  weights file; the model loads every member from the member's own checkpoint.

Per request, the same fields go in vLLM's extra arguments (``SamplingParams.extra_args``, or
``vllm_xargs`` in an OpenAI request's body) with a ``dlf_`` prefix: ``dlf_method``,
``dlf_alpha`` (a float or one per expert), ``dlf_expert``, ``dlf_alpha_range`` ([lo, hi]),
``dlf_grid_step``, ``dlf_solver``, ``dlf_multi_expert``, ``dlf_support_k`` (0 = full
vocabulary), and ``dlf_alpha_log`` (a tag: the request's alphas are written to
``<alpha dir>/<tag>.jsonl``, one line per step). Sampling (temperature, top-p, seed, penalties)
is vLLM's own, per request, on the fused logits. Under vLLM's speculative decoding the
per-request fields are refused (:func:`refuse_under_speculation`): every request is fused with
the directory's defaults.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...options import StepOptions, fields_key

__all__ = [
    "ARCHITECTURE",
    "FORMAT",
    "FUSION_FIELDS",
    "FusedSpec",
    "alpha_dir",
    "build_fused_dir",
    "read_alphas",
    "refuse_under_speculation",
    "request_options",
]

ARCHITECTURE = "DlfFusedForCausalLM"
FORMAT = "dlf_rs.fused/1"
MARKER = "dlf_rs_fused.safetensors"
# The StepOptions fields a fused model takes from its directory or a request; sampling fields
# are vLLM's (its SamplingParams), speculative decoding is vLLM's own.
FUSION_FIELDS = (
    "method", "alpha", "expert", "alpha_range", "grid_step", "solver", "multi_expert",
    "support_k",
)  # fmt: skip
PREFIX = "dlf_"
FUSED_DIR_ENV = "DLF_RS_FUSED_DIR"
ALPHA_LOG = "dlf_alpha_log"
_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)  # fmt: skip


class FusedConfigError(ValueError):
    """A fused directory or a request's DLF options are not what is expected (names the field)."""


def fusion_options(raw: Mapping[str, Any] | None, where: str) -> StepOptions:
    """A StepOptions from fusion fields only; errors name the field as ``where + field``
    (``where`` is e.g. ``"dlf_rs.options."`` or the request prefix ``"dlf_"``)."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(FUSION_FIELDS))
    if unknown:
        raise FusedConfigError(
            f"{where}{unknown[0]}: unknown DLF option; expected one of "
            f"{', '.join(where + f for f in FUSION_FIELDS)}"
        )
    if raw.get("support_k") == 0:
        raw["support_k"] = None
    for key in ("alpha", "alpha_range"):
        if isinstance(raw.get(key), list):
            raw[key] = tuple(raw[key])
    try:
        return StepOptions(**raw)
    except (TypeError, ValueError) as e:
        raise FusedConfigError(f"{where}{e}") from None


def options_json(options: StepOptions) -> dict[str, Any]:
    """The fusion fields of ``options`` as JSON values (what the directory stores)."""
    out: dict[str, Any] = {}
    for name in FUSION_FIELDS:
        v = getattr(options, name)
        out[name] = list(v) if isinstance(v, tuple) else v
    return out


@dataclass(frozen=True)
class FusedSpec:
    """What ``config.json``'s ``dlf_rs`` section says: the members and the default options."""

    large: str
    small: str
    experts: tuple[str, ...]
    options: StepOptions
    root: Path | None = None
    local_files_only: bool = True
    alpha_dir: str | None = None

    @property
    def members(self) -> list[tuple[str, str]]:
        """(name, source) for every member, in the order the model holds them."""
        return [("large", self.large), ("small", self.small)] + [
            (f"expert{t}", e) for t, e in enumerate(self.experts)
        ]

    def resolve(self, source: str) -> str:
        """A member's source as a loadable path or hub id (relative paths: from the root)."""
        if self.root is not None and not os.path.isabs(source):
            candidate = self.root / source
            if candidate.exists():
                return str(candidate)
        return source

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], root: str | os.PathLike[str] | None = None
    ) -> FusedSpec:
        section = config.get("dlf_rs")
        if not isinstance(section, Mapping):
            raise FusedConfigError(
                "config.json: no 'dlf_rs' section; a fused model directory is built by "
                "dlf_rs.engines.vllm.build_fused_dir or `dlf-rs serve`"
            )
        if section.get("format") != FORMAT:
            raise FusedConfigError(
                f"dlf_rs.format: expected {FORMAT!r}, got {section.get('format')!r}"
            )
        for key in ("large", "small"):
            if not isinstance(section.get(key), str) or not section[key]:
                raise FusedConfigError(f"dlf_rs.{key}: expected a path or hub id (a string)")
        experts = section.get("experts")
        if (
            not isinstance(experts, list)
            or not experts
            or not all(isinstance(e, str) and e for e in experts)
        ):
            raise FusedConfigError("dlf_rs.experts: expected a non-empty list of paths or hub ids")
        options = fusion_options(section.get("options"), "dlf_rs.options.")
        check_expert_count(options, len(experts), "dlf_rs.options.")
        return cls(
            large=section["large"],
            small=section["small"],
            experts=tuple(experts),
            options=options,
            root=Path(root) if root is not None else None,
            local_files_only=bool(section.get("local_files_only", True)),
            alpha_dir=section.get("alpha_dir"),
        )


def check_expert_count(options: StepOptions, n_experts: int, where: str) -> None:
    """The options' expert references fit ``n_experts`` experts."""
    if options.method == "expert" and options.expert is not None and options.expert >= n_experts:
        raise FusedConfigError(
            f"{where}expert: expected an expert index in [0, {n_experts}), got {options.expert}"
        )
    if isinstance(options.alpha, tuple) and len(options.alpha) != n_experts:
        raise FusedConfigError(
            f"{where}alpha: expected one float or {n_experts} (one per expert), "
            f"got {len(options.alpha)}"
        )


def request_options(
    extra_args: Mapping[str, Any] | None,
    defaults: StepOptions | None = None,
    n_experts: int | None = None,
) -> tuple[StepOptions | None, str | None]:
    """(options, alpha-log tag) from a request's extra arguments; (None, tag) when the request
    sets no ``dlf_`` field (the directory's defaults apply). A request's fields override the
    defaults one by one; giving any of method, alpha or expert replaces all three (``dlf_alpha``
    alone means static with that alpha). Unknown ``dlf_`` names and bad values raise
    :class:`FusedConfigError` naming the request's field (vLLM answers 400)."""
    if not extra_args:
        return None, None
    raw: dict[str, Any] = {}
    tag = None
    for key, value in extra_args.items():
        if not isinstance(key, str) or not key.startswith(PREFIX):
            continue  # other extensions' arguments
        if key == ALPHA_LOG:
            if not isinstance(value, str) or not _TAG.match(value):
                raise FusedConfigError(
                    f"{ALPHA_LOG}: expected a tag of 1-128 letters, digits, '_', '.' or '-', "
                    f"got {value!r}"
                )
            tag = value
            continue
        name = key[len(PREFIX) :]
        if name not in FUSION_FIELDS:
            raise FusedConfigError(
                f"{key}: unknown DLF option; expected one of "
                f"{', '.join(PREFIX + f for f in FUSION_FIELDS)}, {ALPHA_LOG}"
            )
        raw[name] = value
    if not raw:
        return None, tag
    # A request's record is built and checked once: vLLM's frontend checks the request
    # (validate_params), the worker reads it again when its rows join the batch (once per row
    # with n > 1), and requests repeat option sets; each of those is a look-up here.
    try:
        cache_key: Any = (fields_key(raw), defaults, n_experts)
        options = _REQUESTS.get(cache_key)
    except TypeError:  # a value JSON cannot give (unhashable): build, do not cache
        cache_key, options = None, None
    if options is None:
        options = _merged_options(raw, defaults, n_experts)
        if cache_key is not None and len(_REQUESTS) < 1024:
            _REQUESTS[cache_key] = options
    return options, tag


_REQUESTS: dict[Any, StepOptions] = {}


def refuse_under_speculation(extra_args: Mapping[str, Any] | None) -> None:
    """Under vLLM's speculative decoding no custom logits processor runs, so a request's own
    ``dlf_*`` options (and ``dlf_alpha_log``) cannot be honoured: the fused model fuses every
    position with the directory's defaults. A request that sets one is refused, naming it
    (:class:`FusedConfigError`, which vLLM's server answers with HTTP 400)."""
    if not extra_args:
        return
    keys = sorted(k for k in extra_args if isinstance(k, str) and k.startswith(PREFIX))
    if keys:
        raise FusedConfigError(
            f"{keys[0]}: per-request DLF options are not available with speculative decoding "
            "(vLLM runs no custom logits processor then); this server fuses every request with "
            "its default options: leave out the dlf_* fields, or serve without "
            "--speculative-config"
        )


def _merged_options(
    raw: dict[str, Any], defaults: StepOptions | None, n_experts: int | None
) -> StepOptions:
    """The request's fields over the defaults, checked (see :func:`request_options`)."""
    base = options_json(defaults) if defaults is not None else {}
    if raw.keys() & {"method", "alpha", "expert"}:
        for k in ("method", "alpha", "expert"):
            base.pop(k, None)
    merged = {**{k: v for k, v in base.items() if v is not None}, **raw}
    options = fusion_options(merged, PREFIX)
    if n_experts is not None:
        check_expert_count(options, n_experts, PREFIX)
    return options


_FRONTEND: dict[str, FusedSpec] = {}


def load_spec(fused_dir: str | os.PathLike[str]) -> FusedSpec:
    """The spec of a fused directory (its config.json's ``dlf_rs`` section)."""
    root = Path(fused_dir)
    try:
        config = json.loads((root / "config.json").read_text())
    except FileNotFoundError:
        raise FusedConfigError(f"fused_dir: {root} has no config.json") from None
    return FusedSpec.from_config(config, root)


def frontend_spec() -> FusedSpec | None:
    """The fused directory named by ``$DLF_RS_FUSED_DIR`` (read once), for request checks in a
    process that has no model (vLLM's frontend); None when unset."""
    path = os.environ.get(FUSED_DIR_ENV)
    if not path:
        return None
    if path not in _FRONTEND:
        try:
            _FRONTEND[path] = load_spec(path)
        except (FusedConfigError, OSError, ValueError):
            return None  # not a fused directory: the engine checks what it can
    return _FRONTEND[path]


def alpha_dir(spec: FusedSpec) -> Path:
    """Where ``dlf_alpha_log`` tags are written: the directory's ``alpha_dir`` (relative to the
    fused directory), else ``$DLF_RS_ALPHA_DIR``, else ``<fused dir>/alphas``."""
    if spec.alpha_dir:
        p = Path(spec.alpha_dir)
        return p if p.is_absolute() or spec.root is None else spec.root / p
    env = os.environ.get("DLF_RS_ALPHA_DIR")
    if env:
        return Path(env)
    if spec.root is None:
        raise FusedConfigError("alpha_dir: the fused model has no directory; set DLF_RS_ALPHA_DIR")
    return spec.root / "alphas"


def read_alphas(fused_dir: str | os.PathLike[str], tag: str) -> list[list[float]]:
    """The alphas a request logged under ``tag`` (``dlf_alpha_log``): one list of T floats per
    decoding step, in order (the step that produced token i is line i)."""
    if not _TAG.match(tag):
        raise FusedConfigError(f"tag: expected 1-128 letters, digits, '_', '.' or '-', got {tag!r}")
    path = alpha_dir(load_spec(fused_dir)) / f"{tag}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"tag: no alphas logged under {tag!r} ({path})")
    by_step: dict[int, list[float]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row["alphas"]  # a chunked prefill's row is re-logged: last wins
    return [by_step[s] for s in sorted(by_step)]


def _member_dir(source: str, local_files_only: bool, arg: str) -> Path:
    """A member's local directory (a path, or a hub id from the cache)."""
    p = Path(source)
    if p.is_dir():
        return p
    if p.exists():
        raise FusedConfigError(
            f"{arg}: expected a model directory or hub id, got the file {source}"
        )
    from huggingface_hub import snapshot_download

    from ...hub import hub_scope

    try:
        with hub_scope(local_files_only):
            return Path(snapshot_download(source, local_files_only=local_files_only))
    except Exception as e:  # noqa: BLE001 - the hub's many error types, one message
        where = "in the local cache" if local_files_only else "on the hub"
        raise FusedConfigError(
            f"{arg}: {source!r} is neither a local directory nor a model found {where} ({e})"
        ) from None


def build_fused_dir(
    out: str | os.PathLike[str],
    large: str | os.PathLike[str],
    small: str | os.PathLike[str],
    experts: Sequence[str | os.PathLike[str]],
    options: StepOptions | Mapping[str, Any] | None = None,
    *,
    local_files_only: bool = True,
    alpha_dir: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a fused model directory (see the module doc) and return its path.

    Members keep their sources as given (absolute paths for local directories), so the
    directory stays small; the large model's config, tokenizer and generation config are
    copied in. An expert that is a PEFT LoRA adapter on the small base is merged into a full
    checkpoint under ``experts/`` (:func:`dlf_rs.merge.task_arithmetic` with lambda 1: vLLM
    members are plain models). Checks now what vLLM would fail on later: every member has a config.json with
    the same vocabulary size as the large model, and the options fit the experts.
    """
    import torch
    from safetensors.torch import save_file

    if isinstance(experts, (str, os.PathLike)):
        raise FusedConfigError("experts: expected a list of paths or hub ids, got one string")
    if not experts:
        raise FusedConfigError("experts: expected at least one expert")
    if isinstance(options, StepOptions):
        opts = fusion_options(options_json(options), "options.")
    else:
        opts = fusion_options(options, "options.")
    check_expert_count(opts, len(experts), "options.")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FusedConfigError(f"out: {out} exists and is not empty (pass overwrite=True)")
        shutil.rmtree(out)
    sources = [("large", str(large)), ("small", str(small))] + [
        (f"experts[{t}]", str(e)) for t, e in enumerate(experts)
    ]
    dirs = {arg: _member_dir(src, local_files_only, arg) for arg, src in sources}
    out.mkdir(parents=True, exist_ok=True)
    for t in range(len(experts)):
        arg = f"experts[{t}]"
        if (dirs[arg] / "adapter_config.json").exists():  # LoRA: merged into a full expert
            from ...merge import task_arithmetic

            merged = out / "experts" / f"expert{t}"
            try:
                task_arithmetic(dirs["small"], [dirs[arg]], 1.0, merged)
            except (ValueError, TypeError, OSError) as e:
                raise FusedConfigError(
                    f"{arg}: cannot merge the LoRA adapter {dirs[arg]}: {e}"
                ) from None
            dirs[arg] = merged
            sources[2 + t] = (arg, f"experts/expert{t}")
    configs = {}
    for arg, d in dirs.items():
        cfg_path = d / "config.json"
        if not cfg_path.exists():
            raise FusedConfigError(f"{arg}: {d} has no config.json")
        configs[arg] = json.loads(cfg_path.read_text())
    vocab = configs["large"].get("vocab_size")
    for arg, cfg in configs.items():
        if cfg.get("vocab_size") != vocab:
            raise FusedConfigError(
                f"{arg}: vocabulary size {cfg.get('vocab_size')} differs from the large model's "
                f"{vocab}; the members must share one tokenizer and vocabulary"
            )
    for name in _TOKENIZER_FILES:
        src = dirs["large"] / name
        if src.exists():
            shutil.copy2(src, out / name)
    if not (out / "tokenizer_config.json").exists() and not (out / "tokenizer.json").exists():
        raise FusedConfigError(f"large: {dirs['large']} has no tokenizer files to serve with")

    def keep(arg: str, src: str) -> str:
        p = Path(src)
        if src.startswith("experts/"):  # merged here: relative to the fused directory
            return src
        return str(p.resolve()) if p.is_dir() else src

    config = dict(configs["large"])
    config["architectures"] = [ARCHITECTURE]
    config["dlf_rs"] = {
        "format": FORMAT,
        "large": keep("large", sources[0][1]),
        "small": keep("small", sources[1][1]),
        "experts": [keep(a, s) for a, s in sources[2:]],
        "options": options_json(opts),
        "local_files_only": local_files_only,
        **({"alpha_dir": alpha_dir} if alpha_dir else {}),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({"dlf_rs_fused.marker": torch.zeros(1)}, str(out / MARKER),
              metadata={"format": "pt", "dlf_rs": FORMAT})  # fmt: skip
    return out
