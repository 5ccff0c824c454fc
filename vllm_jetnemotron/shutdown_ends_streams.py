"""A server told to stop (SIGTERM, Ctrl-C) ends the requests it still streams, so it exits.

Upstream cause (vLLM 0.32.0, `vllm/v1/engine/async_llm.py`, `AsyncLLM.shutdown`): shutting
down stops the engine core and cancels the output handler task, the only thing that feeds the
per-request output queues that `AsyncLLM.generate` waits on. A request still running at that
moment is neither finished nor failed: its `generate` waits forever, so its HTTP response
never ends, and uvicorn's shutdown (`serve_http` in `vllm/entrypoints/launchers/launcher.py`)
waits for every connection to close ("Waiting for connections to close"), without a bound
(`timeout_graceful_shutdown` is not set). The server exits only when the last client gives up;
a client without a timeout keeps it alive for ever. (A dying engine does not have the
problem: the output handler's error path puts the error in every queue.)

The fix does on shutdown what that error path does: every unfinished request gets a 503 saying
the server is shutting down (vLLM's `GracefulHTTPError`, which `generate` passes through as it
is and clients retry elsewhere), put in its queue on the event loop that serves it (`shutdown`
runs in an executor thread there). A streamed response then ends with vLLM's own error chunk and
`[DONE]`, a plain one with the 503, and the connections close. The error is queued before the
upstream shutdown starts: the engine core aborts its requests when it is stopped, and an abort
delivered first would end a stream as `finish_reason: "abort"` instead (a request's queue keeps
an error over any output that follows it); and again after it, for a request admitted meanwhile.

Applied only where it is needed: `needs_fix` reads the installed `AsyncLLM.shutdown` and
patches it unless it already fails the requests it leaves (`propagate_error`). Installed from
`plugin.register`; the module is patched when it is imported (`import_hooks`), which happens
only in processes that run an `AsyncLLM` (the API server).
"""

import asyncio
import functools
import inspect
from http import HTTPStatus

from .import_hooks import patch_when_imported
from .patches import replace_once

ASYNC_LLM_MODULE = "vllm.v1.engine.async_llm"
_MARKER = "_jetnemotron_shutdown_ends_streams"
SHUTDOWN_MESSAGE = "the server is shutting down"


def install() -> None:
    patch_when_imported(ASYNC_LLM_MODULE, patch_module)


def needs_fix(shutdown) -> bool:
    """True when `AsyncLLM.shutdown` leaves unfinished requests waiting (vLLM 0.32)."""
    try:
        return "propagate_error" not in inspect.getsource(shutdown)
    except (OSError, TypeError):
        return False


def patch_module(module) -> bool:
    """Wrap `module.AsyncLLM.shutdown` (once) if it has the bug. Returns whether it carries the fix."""
    from vllm.exceptions import GracefulHTTPError

    def wrap(upstream):
        @functools.wraps(upstream)
        def shutdown(self, *args, **kwargs):
            error = GracefulHTTPError(SHUTDOWN_MESSAGE, HTTPStatus.SERVICE_UNAVAILABLE)
            fail_unfinished_requests(self, error)
            try:
                return upstream(self, *args, **kwargs)
            finally:
                fail_unfinished_requests(self, error)
        return shutdown

    return replace_once(getattr(module, "AsyncLLM", None), "shutdown", __name__, needs_fix, wrap, _MARKER)


def fail_unfinished_requests(async_llm, error: Exception) -> None:
    """Put `error` in the output queue of every request `async_llm` has not finished, on the
    event loop of its output handler."""
    processor = getattr(async_llm, "output_processor", None)
    handler = getattr(async_llm, "output_handler", None)
    if processor is None or handler is None or not processor.has_unfinished_requests():
        return
    loop = handler.get_loop()
    if loop.is_closed():
        return

    def fail() -> None:
        processor.propagate_error(error)

    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fail()
    else:
        loop.call_soon_threadsafe(fail)
