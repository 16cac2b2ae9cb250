"""The engines: what runs the members' forward passes and feeds their logits to the core.

Every engine does the same thing each decoding step: run the large base, the small base and each
expert on the rows' new tokens, take their last-position logits without copying them, and let
the Rust core decide the weights and the fused row (:func:`dlf_rs.fuse_step`, or for a batch of
rows with different options :func:`dlf_rs.engines.fusion.fuse_rows`). What differs is who owns
the KV caches, the batch and the sampler:

- :mod:`dlf_rs.engines.hf`: the Hugging Face loop, :class:`dlf_rs.FusedGenerator` (torch models,
  its own batches, the core samples; speculative DLF and scoring on the same runner).
- :mod:`dlf_rs.engines.vllm`: DLF inside vLLM (a fused vLLM model; vLLM's paged caches,
  continuous batching and sampler; ``dlf-rs serve``). Imports vLLM.
- :mod:`dlf_rs.engines.llamacpp`: GGUF files on llama.cpp,
  :class:`~dlf_rs.engines.llamacpp.LlamaCppGenerator` (a context per member, multi-sequence
  batches, the core samples; speculative DLF; ``dlf-rs generate --engine llamacpp``). Imports
  llama_cpp, no torch.
- :mod:`dlf_rs.engines.fusion`: the engine-independent part, shared: one step's fusion of a
  batch whose rows carry their own :class:`dlf_rs.StepOptions`.

What every engine shares beside them lives at the package's top level: the options record
(:mod:`dlf_rs.options`), the checked step API (:mod:`dlf_rs.step`), prompts and chat templates
(:mod:`dlf_rs.inputs`), stop strings (:mod:`dlf_rs.stopping`), seeds (:mod:`dlf_rs.seeds`) and
results (:mod:`dlf_rs.results`). Importing this package imports no engine.
"""
