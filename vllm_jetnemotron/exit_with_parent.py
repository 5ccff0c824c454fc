"""The processes vLLM starts under `python -m vllm_jetnemotron` exit when their parent dies.

Upstream behaviour (vLLM 0.32): the API server starts the EngineCore with multiprocessing
(`spawn` on CPU), not as a daemon (`CoreEngineProcManager`, `vllm/v1/engine/utils.py`), and
the EngineCore never watches its parent: it waits on ZMQ sockets, which do not report a
vanished peer. The parent's cleanup (`weakref.finalize`, `shutdown()`: SIGTERM, then SIGKILL)
is Python code, which a SIGKILL or the OOM killer never lets run. The workers watch only their
own parent, the EngineCore, through a death pipe (`vllm/v1/executor/multiproc_executor.py`).
So an API server killed that way leaves its EngineCore and workers running with all their
memory, while its port is free for a new server.

The entry point calls `mark_children()`. Each vLLM process it starts calls `arm()` (from the
plugin's `register()`, which every vLLM process runs): the kernel will send it SIGTERM when
its parent exits (`PR_SET_PDEATHSIG`), on which vLLM's own handler shuts it down as when the
server stops it, and it marks its own children in turn. The top-level process is not armed, so
the server still outlives the shell that started it. Linux only; elsewhere nothing changes.

The kernel sends the signal when the thread that started the process ends; vLLM starts the
EngineCore and its workers from the main thread of their parent.
"""

import ctypes
import os
import signal
import sys

# The pid of the process whose vLLM children are to exit with it.
PARENT_PID_ENV = "JETNEMOTRON_EXIT_WITH_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def mark_children() -> None:
    """Have the vLLM processes this process starts from now on exit when it does."""
    os.environ[PARENT_PID_ENV] = str(os.getpid())


def arm() -> None:
    """In a process started by a marked parent: receive SIGTERM when that parent exits (at
    once if it already has), and mark this process's own children. Idempotent."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not sys.platform.startswith("linux") or parent in (None, str(os.getpid())):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    mark_children()
    if str(os.getppid()) != parent:  # the parent died before the prctl: no signal will come
        signal.raise_signal(signal.SIGTERM)
