"""The Hugging Face engine: :class:`dlf_rs.FusedGenerator` and the modules it is built from.

In the order of the flow: :mod:`.loading` (checkpoints: local paths or cached hub ids,
safetensors, GGUF, dtype, device maps), :mod:`.lora` (LoRA adapter experts, mixed batches),
:mod:`.generate` (loading, argument checks, the decode loop),
:mod:`.runner` (forwards and KV caches), :mod:`.staging` (host buffers the core reads),
:mod:`.fastpath` (static caches and CUDA graphs), :mod:`.speculative` (speculative DLF's rounds) and :mod:`.scoring` (fused
log-likelihoods). Needs torch and transformers (the ``generate`` extra).
"""
