"""A server process (`vllm serve` and the like) for the benchmarks and the tests: started on
a free loopback port with its output in a log file, waited for until `/health` answers, and
stopped with its whole process tree (API server, engine core, workers)."""

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil

LOG_TAIL_CHARS = 4000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(command: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """`command` started with its stdout and stderr in `log_path`; does not wait for it."""
    with open(log_path, "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def log_tail(log_path: Path) -> str:
    return Path(log_path).read_text(errors="replace")[-LOG_TAIL_CHARS:]


def wait_until_healthy(process: subprocess.Popen, base_url: str, log_path: Path, timeout: float = 600.0) -> None:
    """Polls `base_url`/health every second until it answers 200. Raises RuntimeError if the
    process exits first, TimeoutError after `timeout` seconds; either with the log's tail."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} ({log_path}):\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not healthy after {timeout:.0f} s ({log_path}):\n{log_tail(log_path)}")
        time.sleep(1)


def start_server(command: list[str], log_path: Path, base_url: str, timeout: float = 600.0,
                 env: dict | None = None) -> subprocess.Popen:
    """`spawn_server`, then `wait_until_healthy`; a server that fails to get healthy is
    stopped before the error is raised."""
    process = spawn_server(command, log_path, env)
    try:
        wait_until_healthy(process, base_url, log_path, timeout)
    except BaseException:
        stop_server(process)
        raise
    return process


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM, SIGKILL after 60 s; then SIGKILL to whatever of its process tree (as it was
    before the SIGTERM) is still running 10 s later."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
