"""Host staging of next-token logits: the bridge between the models' forwards and ``fuse_step``.

Flow of one decoding step in ``generate.py``: every model runs its forward on its own device ->
:meth:`LogitStaging.stage` enqueues a copy of the last-position logits (cut to the tokenizer's
vocabulary) into a host buffer -> :meth:`LogitStaging.wait` synchronises once for all of them ->
:meth:`LogitStaging.views` hands zero-copy numpy views to ``dlf_rs.fuse_step`` / ``dlf_rs.sample``
-> :meth:`LogitStaging.tokens_to` sends only the chosen token ids back to each device.

The host buffers are allocated once per (batch, vocab, model count) and reused across steps and
calls; they are pinned when CUDA is available so the device-to-host copies can be asynchronous.
Logits that already are C-contiguous float32 CPU tensors (a CPU model's own output) are not
copied at all: the view is the tensor's memory, kept alive until that slot's next ``stage``.
While the Rust core reads the views (with the GIL released) nothing writes to them: the next
``stage`` happens only after ``fuse_step`` returned, and a forward writes a fresh output tensor.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["LogitStaging"]


class LogitStaging:
    """Reusable float32 host buffers ``[batch, vocab]``, one per model slot."""

    def __init__(self, n_models: int, batch: int, vocab: int, pin: bool | None = None) -> None:
        if pin is None:
            pin = torch.cuda.is_available()
        self.n_models = n_models
        self.batch = batch
        self.vocab = vocab
        self.pinned = bool(pin)
        self._host = [
            torch.empty((batch, vocab), dtype=torch.float32, pin_memory=self.pinned)
            for _ in range(n_models)
        ]
        # numpy views share memory with the torch buffers; created once.
        self._host_views = [buf.numpy() for buf in self._host]
        self._views = list(self._host_views)
        self._held: list[torch.Tensor | None] = [None] * n_models  # zero-copy sources
        self._token_host = torch.empty((batch,), dtype=torch.long, pin_memory=self.pinned)
        self._pending: dict[tuple[torch.device, int], torch.cuda.Event] = {}

    def matches(self, n_models: int, batch: int, vocab: int) -> bool:
        return (self.n_models, self.batch, self.vocab) == (n_models, batch, vocab)

    def stage(self, slot: int, logits: torch.Tensor) -> None:
        """Enqueue the copy of ``logits`` (``[batch, >= vocab]``, any dtype/device) into ``slot``.

        Extra columns (checkpoints that pad their embedding matrix) are cut here. The dtype
        conversion happens on the source device so the transfer itself is a plain f32 copy.
        """
        src = logits[:, : self.vocab]
        if src.device.type == "cpu" and src.dtype == torch.float32 and src.is_contiguous():
            self._held[slot] = src  # zero-copy: the core reads the forward's own output
            self._views[slot] = src.numpy()
            return
        self._held[slot] = None
        self._views[slot] = self._host_views[slot]
        if src.dtype != torch.float32:
            src = src.to(torch.float32)
        if src.device.type == "cuda":
            self._host[slot].copy_(src, non_blocking=True)
            stream = torch.cuda.current_stream(src.device)
            event = torch.cuda.Event()
            event.record(stream)
            # One event per stream (the fast path runs the small models on a side stream): the
            # last one recorded covers every earlier copy on that stream.
            self._pending[(src.device, stream.stream_id)] = event
        else:
            self._host[slot].copy_(src)

    def wait(self) -> None:
        """The step's single synchronisation point: wait for every enqueued copy."""
        for event in self._pending.values():
            event.synchronize()
        self._pending.clear()

    def views(self) -> list[np.ndarray]:
        """Zero-copy float32 numpy views of the host buffers (valid until the next ``stage``)."""
        return self._views

    def view(self, slot: int) -> np.ndarray:
        return self._views[slot]

    def tokens_to(self, tokens: np.ndarray, device: torch.device) -> torch.Tensor:
        """Next tokens ``int64[batch]`` from the host to ``device`` as ``[batch, 1]``."""
        ids = np.ascontiguousarray(tokens, dtype=np.int64)
        if device.type == "cpu":
            return torch.from_numpy(ids.copy()).view(-1, 1)  # its own memory: models may keep it
        host = self._token_host
        host.copy_(torch.from_numpy(ids))
        return host.to(device, non_blocking=True).view(-1, 1)
