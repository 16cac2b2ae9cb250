"""Draining shutdown for ``dlf-rs serve`` (docs/vllm.md, "Shutdown").

vLLM 0.32's OpenAI server, on SIGTERM or SIGINT, stops the engine first (``--shutdown-timeout``
0: aborts its requests; N: lets them run up to N seconds, then kills it) and only then its HTTP
server, which waits without limit for the open responses: a request the engine no longer serves
is never answered, so clients hang and the server stays up. A second signal is ignored.

:func:`install` wraps vLLM's ``serve_http`` (in our own process, no vLLM file is changed) so that
the first SIGTERM or SIGINT drains in front of the engine instead:

1. new HTTP requests (every path, ``/health`` included, so that a load balancer stops sending)
   are answered at once with HTTP 503, an OpenAI-style error saying the server is shutting down;
2. requests in flight run on, up to the grace period (vLLM's ``--shutdown-timeout``, which
   ``dlf-rs serve`` sets to :data:`DEFAULT_GRACE_S` unless the caller chose one);
3. those still running then end with that error: a response not yet started is an HTTP 503, a
   stream gets an ``error`` event (the ``openai`` client raises ``APIError``) and ``[DONE]``;
   their engine requests are aborted (cancelled, as a client disconnect is);
4. the engine, now idle, is stopped (in what is left of the grace, :data:`TEARDOWN_S` at least;
   then vLLM kills it) and then the HTTP server, which has nothing left to wait for.

A second SIGTERM or SIGINT kills the server's child processes and exits at once (status 128 +
the signal): open connections are closed, without an error body.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any

# The grace period ``dlf-rs serve`` gives in-flight requests when the caller chose none (vLLM's
# ``--shutdown-timeout``): under Kubernetes' default terminationGracePeriodSeconds (30 s, then
# SIGKILL) with room for the engine's teardown.
DEFAULT_GRACE_S = 25
# After the grace: how long ending the requests left may take (each of two steps), how long the
# idle engine may take to stop before vLLM kills it when the grace is spent (its workers'
# teardown took 2-4 s on a busy 2-core CPU), and how long uvicorn then waits for connections
# still open (none are expected). The process exits within about
# grace + 2 x ENDING_S + TEARDOWN_S + HTTP_CLOSE_S.
ENDING_S = 0.5
TEARDOWN_S = 3.0
HTTP_CLOSE_S = 1
MESSAGE = "the server is shutting down"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def error_body(message: str = MESSAGE) -> bytes:
    """vLLM's error shape (``ErrorResponse``), status 503."""
    error = {"message": message, "type": "ServiceUnavailableError", "param": None, "code": 503}
    return json.dumps({"error": error}).encode()


class _Request:
    """One HTTP request in flight: what of its response was sent, and its app task."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False  # http.response.start sent
        self.complete = False  # the last body part sent
        self.stream = False  # text/event-stream
        self.ended = False  # ended by the drain: the app's further messages are dropped
        self.task: asyncio.Future[None] | None = None

    async def send(self, message: Message) -> None:
        if self.ended:
            return
        if message["type"] == "http.response.start":
            self.started = True
            self.stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                              for k, v in message.get("headers", []))  # fmt: skip
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self._send(message)

    async def send_error(self) -> None:
        """The shutdown error, in whatever form the response so far allows."""
        if self.complete:
            return
        if not self.started:
            body = error_body()
            await self._send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode())]})  # fmt: skip
            await self._send({"type": "http.response.body", "body": body})
        elif self.stream:
            body = b"data: " + error_body() + b"\n\ndata: [DONE]\n\n"
            await self._send({"type": "http.response.body", "body": body})
        else:  # a plain body half sent (vLLM sends them whole): close it, the client sees it cut
            await self._send({"type": "http.response.body", "body": b""})


class Drain:
    """The shutdown state shared by the middleware and the signal handlers."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.draining = False
        self.inflight: set[_Request] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.task: asyncio.Task[None] | None = None

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def call(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            if self.draining:
                body = error_body()
                await send({"type": "http.response.start", "status": 503, "headers": [
                    (b"content-type", b"application/json"), (b"connection", b"close"),
                    (b"content-length", str(len(body)).encode())]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
            req = _Request(send)
            req.task = asyncio.ensure_future(app(scope, receive, req.send))
            self.inflight.add(req)
            self.idle.clear()
            try:
                await req.task
            except asyncio.CancelledError:
                if not req.ended:
                    raise
                await req.send_error()
            finally:
                self.inflight.discard(req)
                if not self.inflight:
                    self.idle.set()

        return call

    async def drain(self, engine_client: Any, server: Any, logger: Any) -> None:
        """Steps 2-4 of the module's docstring."""
        t0 = time.monotonic()
        logger.info("[shutdown] dlf-rs: draining: %d request(s) in flight, grace %ss; new "
                    "requests get 503; a second SIGTERM/SIGINT stops at once",
                    len(self.inflight), self.grace_s)  # fmt: skip
        if self.inflight:
            try:
                await asyncio.wait_for(self.idle.wait(), self.grace_s)
            except asyncio.TimeoutError:
                await self._end_all(engine_client, logger)
        # The engine may use what is left of the grace to stop cleanly, TEARDOWN_S at least.
        teardown = max(TEARDOWN_S, t0 + self.grace_s - time.monotonic())
        logger.info("[shutdown] dlf-rs: requests done after %.1fs; stopping the engine (at most "
                    "%.1fs)", time.monotonic() - t0, teardown)  # fmt: skip
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, partial(engine_client.shutdown, timeout=teardown))
        finally:
            server.should_exit = True

    async def _end_all(self, engine_client: Any, logger: Any) -> None:
        left = list(self.inflight)
        logger.warning("[shutdown] dlf-rs: grace of %ss over: ending %d request(s) with HTTP "
                       "503 / a stream error", self.grace_s, len(left))  # fmt: skip
        for req in left:
            req.ended = True
            if req.task is not None:
                req.task.cancel()
        try:
            await asyncio.wait_for(self.idle.wait(), ENDING_S)
        except asyncio.TimeoutError:
            logger.warning("[shutdown] dlf-rs: %d request(s) did not end", len(self.inflight))
        # A cancelled response does not always reach its engine request's abort (Starlette's
        # streams cancel again inside it): abort whatever the engine still runs, else the
        # engine's own drain would run it on until it is killed.
        try:
            await asyncio.wait_for(
                engine_client.pause_generation(mode="abort", clear_cache=False), ENDING_S)
        except Exception as err:  # noqa: BLE001 - the engine's shutdown bounds it anyway
            logger.warning("[shutdown] dlf-rs: aborting the engine's requests: %r", err)


def _stop_now(signum: int) -> None:
    """Kill the server's child processes (the engine and its workers), then exit."""
    try:
        import psutil  # vLLM's own dependency

        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
    finally:
        os._exit(128 + signum)


def install() -> bool:
    """Wrap the ``serve_http`` that vLLM's OpenAI server entry calls; False where this vLLM has
    no such entry (then its own shutdown applies)."""
    try:
        from vllm.entrypoints.launchers.api_server import entry
        from vllm.logger import init_logger
    except ImportError:
        return False
    original = entry.serve_http
    logger = init_logger("vllm.dlf_rs.shutdown")

    async def serve_http(app: Any, sock: Any, *args: Any, **kwargs: Any) -> Any:
        engine_client = app.state.engine_client
        drain = Drain(float(engine_client.vllm_config.shutdown_timeout))
        # Outermost, around the stack vLLM has already built (add_middleware is refused now).
        app.middleware_stack = drain.middleware(app.middleware_stack or app.build_middleware_stack())
        kwargs.setdefault("timeout_graceful_shutdown", HTTP_CLOSE_S)
        serving = asyncio.ensure_future(original(app, sock, *args, **kwargs))
        # vLLM's serve_http sets app.state.server and then its signal handlers before it first
        # waits (one step of its task); ours replace them once it has.
        for _ in range(100):
            if hasattr(app.state, "server") or serving.done():
                break
            await asyncio.sleep(0)
        else:
            logger.warning("[shutdown] dlf-rs: vLLM's server did not start as expected; its own "
                           "shutdown applies (no drain)")  # fmt: skip
            return await serving
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if drain.draining:
                logger.warning("[shutdown] dlf-rs: second %s: stopping now",
                               signal.Signals(signum).name)  # fmt: skip
                _stop_now(signum)
            drain.draining = True
            drain.task = loop.create_task(drain.drain(engine_client, app.state.server, logger))

        if not serving.done():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal, sig)
        return await serving

    entry.serve_http = serve_http
    return True
