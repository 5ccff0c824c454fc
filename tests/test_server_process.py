"""Real `python -m vllm_jetnemotron serve` process trees, started with an API key: one refuses
requests without the key, and a SIGKILL of its API server takes the EngineCore and worker
processes with it; another gets SIGTERM with 16 streams open, ends them and exits. Also the
race `exit_with_parent.arm` covers: a parent that dies before its child arms."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest

from conftest import SERVER_START_TIMEOUT, openai_client, serve_command
from server_process import free_port, spawn_server, wait_until_healthy
from vllm_jetnemotron import exit_with_parent

API_KEY = "test-key-3f9a"
SERVED_NAME = "jet-tiny"


class Server:
    """`python -m vllm_jetnemotron serve` on loopback with `--api-key`, and its processes."""

    def __init__(self, checkpoint: str, log_path, max_model_len: int = 512):
        self.log_path = log_path
        port = free_port()
        command = serve_command(checkpoint, port, "--api-key", API_KEY, "--served-model-name", SERVED_NAME,
                                "--max-model-len", str(max_model_len))
        self.process = spawn_server(command, log_path)
        self.tree = [psutil.Process(self.process.pid)]  # the API server and, once up, its descendants
        self.base = f"http://127.0.0.1:{port}"

    def wait_until_healthy(self) -> None:
        wait_until_healthy(self.process, self.base, self.log_path, timeout=SERVER_START_TIMEOUT)
        self.tree += self.tree[0].children(recursive=True)

    def kill_tree(self) -> None:
        """SIGKILL every process of the tree still running (psutil checks each is the
        process it was, not a new one with a reused pid)."""
        if self.tree[0].is_running():
            self.tree += self.tree[0].children(recursive=True)
        for process in self.tree:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.wait()


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    server = Server(tiny_checkpoint, tmp_path_factory.mktemp("server") / "server.log")
    try:
        server.wait_until_healthy()
        yield server
    finally:
        server.kill_tree()


def test_requests_need_the_api_key(server):
    request = {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 2}
    assert httpx.post(f"{server.base}/v1/completions", json=request, timeout=60).status_code == 401
    wrong = openai_client(server.base, api_key="wrong-key", timeout=60)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(**request)
    client = openai_client(server.base, api_key=API_KEY, timeout=60)
    assert client.completions.create(**request).usage.completion_tokens == 2


def running(process: psutil.Process) -> bool:
    """Alive and not a zombie (which holds no memory; reaping it is up to init)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_killed_api_server_takes_engine_and_workers_with_it(server):
    # Runs after the other test: it ends the server.
    api_server, *children = server.tree
    titles = {p.pid: " ".join(p.cmdline()) for p in children}
    assert any("EngineCore" in t for t in titles.values()), titles
    assert any("Worker" in t for t in titles.values()), titles
    api_server.send_signal(signal.SIGKILL)
    server.process.wait()
    deadline = time.monotonic() + 10
    while any(map(running, children)) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [titles[p.pid] for p in children if running(p)]
    assert not alive, f"alive 10 s after the API server was killed: {alive}"


def test_sigterm_ends_open_streams_and_the_server_exits(tiny_checkpoint, tmp_path):
    """SIGTERM while 16 streams (clients without a timeout) are generating: each stream ends
    with the server's 503 "shutting down" error chunk, and the whole process tree exits, within
    10 s. (vLLM 0.32 left the streams waiting and the server up until the clients gave up:
    `shutdown_ends_streams.py`.)"""
    server = Server(tiny_checkpoint, tmp_path / "server.log", max_model_len=4096)
    client = openai_client(server.base, api_key=API_KEY, timeout=None)
    generating = threading.Semaphore(0)
    outcomes: dict[int, str] = {}

    def stream(i: int) -> None:
        try:
            chunks = client.completions.create(model=SERVED_NAME, prompt=f"stream {i}:", max_tokens=4000,
                                               stream=True, extra_body={"ignore_eos": True})
            for n, chunk in enumerate(chunks):
                if n == 1:
                    generating.release()
            outcomes[i] = f"finished: {chunk.choices[0].finish_reason}"
        except openai.APIError as error:
            outcomes[i] = f"error {error.body.get('code') if isinstance(error.body, dict) else None}: {error}"

    try:
        server.wait_until_healthy()
        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(16)]
        for thread in threads:
            thread.start()
        for _ in threads:
            assert generating.acquire(timeout=120), f"not all streams started: {outcomes}"
        assert not outcomes, outcomes  # all 16 still generating
        api_server, *children = server.tree
        stopped = time.monotonic()
        api_server.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=max(0.0, stopped + 10 - time.monotonic()))
        assert not any(t.is_alive() for t in threads), f"streams still open 10 s after SIGTERM: {outcomes}"
        assert sorted(outcomes.values()) == ["error 503: the server is shutting down"] * 16, outcomes
        server.process.wait(timeout=max(0.1, stopped + 10 - time.monotonic()))
        deadline = stopped + 10
        while any(map(running, children)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(running, children))
    finally:
        server.kill_tree()


# A process started by a marked parent that is already gone when it arms (reparented). Both
# import the module alone: the package imports transformers, seconds per process.
_ORPHAN = """
import os, time
from exit_with_parent import PARENT_PID_ENV, arm
while os.getppid() == int(os.environ[PARENT_PID_ENV]):
    time.sleep(0.01)
arm()
time.sleep(600)
"""
_PARENT = f"""
import subprocess, sys
from exit_with_parent import mark_children
mark_children()
orphan = subprocess.Popen([sys.executable, "-c", {_ORPHAN!r}],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(orphan.pid)
"""


def test_a_process_whose_parent_died_before_it_armed_exits():
    env = {**os.environ, "PYTHONPATH": os.path.dirname(exit_with_parent.__file__)}
    parent = subprocess.run([sys.executable, "-c", _PARENT], env=env, capture_output=True,
                            text=True, timeout=60, check=True)
    orphan = psutil.Process(int(parent.stdout))
    try:
        deadline = time.monotonic() + 10
        while running(orphan) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not running(orphan)
    finally:
        if running(orphan):
            orphan.kill()
