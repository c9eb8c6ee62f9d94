"""The bundled llama-server on a free port of 127.0.0.1, for tests, tools and apps that drive it from Python.

    with Server(["-m", "model.gguf", "--kv-profile", "qaq.gguf"], Path("server.log")) as s:
        s.wait_ready()
        print(s.get("/props")[2]["kv_cache"]["layers"])
        print(s.post("/completion", {"prompt": "Hello", "n_predict": 8})["content"])

Server.python_openai(args, log) runs llama-cpp-python's OpenAI-compatible server with KV profiles
(qaq_gguf.openai_server) the same way.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from . import _native


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """llama-server started with ``args`` (``-m MODEL ...``; host and port are chosen here), its output in ``log``."""

    health = "/health"

    def __init__(self, args: list[str], log: Path, program: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        program = program or [str(_native.bin_dir() / "llama-server")]
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen([*program, "--host", "127.0.0.1", "--port", str(self.port), *args],
                                         stdout=f, stderr=subprocess.STDOUT)

    @classmethod
    def python_openai(cls, args: list[str], log: Path) -> "Server":
        """`python -m qaq_gguf.openai_server ARGS` (llama-cpp-python's server; ready when /v1/models answers)."""
        s = cls(args, log, [sys.executable, "-m", "qaq_gguf.openai_server"])
        s.health = "/v1/models"
        return s

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 120.0) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args[0]} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.proc.args[0]} not ready after {timeout:g} s:\n{self.log.read_text()[-3000:]}")

    def get(self, path: str):
        """(status, content type, body): the body parsed as JSON for /props, /health and /v1/..., bytes otherwise."""
        req = urllib.request.Request(self.url + path, headers={"Accept-Encoding": "gzip"})  # the UI is served gzipped
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read()
            return r.status, r.headers.get("Content-Type", ""), json.loads(body) \
                if path.endswith(("/props", "/health")) or path.startswith("/v1/") else body

    def post(self, path: str, payload: dict, timeout: float = 300) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def stream(self, path: str, payload: dict, timeout: float = 300) -> list[dict]:
        """POST with "stream": true; the server-sent events' JSON payloads, in order, up to "data: [DONE]"."""
        req = urllib.request.Request(self.url + path, data=json.dumps(dict(payload, stream=True)).encode(),
                                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        events = []
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                events.append(json.loads(data))
        return events

    def rss_mib(self) -> float:
        """The server's resident memory, MiB (NaN once it has exited)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
