"""The bundled llama-server on a free port of 127.0.0.1, for tests, tools and apps that drive it from Python.

    with Server(["-m", "model.gguf", "--kv-profile", "qaq.gguf"], Path("server.log")) as s:
        s.wait_ready()
        print(s.get("/props")[2]["kv_layer_types"])
        print(s.post("/completion", {"prompt": "Hello", "n_predict": 8})["content"])
"""
from __future__ import annotations

import json
import socket
import subprocess
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

    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        exe = _native.bin_dir() / "llama-server"
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen([str(exe), "--host", "127.0.0.1", "--port", str(self.port), *args],
                                         stdout=f, stderr=subprocess.STDOUT)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 120.0) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"llama-server not ready after {timeout:g} s:\n{self.log.read_text()[-3000:]}")

    def get(self, path: str):
        """(status, content type, body): the body parsed as JSON for /props and /health, bytes otherwise."""
        req = urllib.request.Request(self.url + path, headers={"Accept-Encoding": "gzip"})  # the UI is served gzipped
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read()
            return r.status, r.headers.get("Content-Type", ""), body if not path.endswith(("/props", "/health")) \
                else json.loads(body)

    def post(self, path: str, payload: dict, timeout: float = 300) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

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
