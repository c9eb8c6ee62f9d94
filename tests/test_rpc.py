"""Profiles over llama.cpp's RPC backend: Gemma 3 270M split over two local rpc-servers (`qaq-gguf rpc-server`)
with a mixed profile of ggml's and our types gives the local run's logits, each layer's cache in its own type on the
server that holds the layer; a server without our types (an older rpc-server) is refused by name before any tensor
of such a type reaches it; llama-server --rpc reports the devices in /props.

Every model here loads in a child process: RPC devices, once registered, stay for the life of a process."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from qaq_gguf import _native, profile
from qaq_gguf.server import free_port

pytestmark = pytest.mark.skipif(not (_native.bin_dir() / "ggml-rpc-server").is_file(),
                                reason="this build has no ggml-rpc-server (built without GGML_RPC)")


class RpcServer:
    def __init__(self, log):
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([str(_native.bin_dir() / "ggml-rpc-server"), "-H", "127.0.0.1", "-p",
                                          str(self.port), "-t", "1"], stdout=f, stderr=subprocess.STDOUT)
        t0 = time.time()
        while time.time() - t0 < 30:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        raise RuntimeError(f"rpc-server did not start:\n{open(log).read()[-2000:]}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class OldServerProxy:
    """A TCP proxy in front of an rpc-server that answers HELLO as a server from before this change does (the
    byte that now carries the server's type count is 0, as it was padding): what an older rpc-server tells a
    client, everything else relayed unchanged."""
    HELLO_N_TYPES_OFFSET = 8 + 3  # the reply's uint64 size, then major, minor, patch, n_types

    def __init__(self, target_port: int):
        self.target = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src, dst, from_server: bool):
        seen = 0
        try:
            while data := src.recv(65536):
                if from_server and seen <= self.HELLO_N_TYPES_OFFSET < seen + len(data):
                    data = bytearray(data)
                    data[self.HELLO_N_TYPES_OFFSET - seen] = 0
                    data = bytes(data)
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


@pytest.fixture
def two_servers(tmp_path):
    servers = [RpcServer(tmp_path / f"rpc{i}.log") for i in range(2)]
    yield servers
    for s in servers:
        s.stop()


_CHILD = r"""
import json, sys
import numpy as np
import llama_cpp.llama_cpp as lc
from qaq_gguf import Llama, ProfileError, runtime
model, prof, rpc = sys.argv[1], sys.argv[2], sys.argv[3]
# the same kernels as the rpc-servers' CPU backend, so that any difference is the RPC path's: weights not repacked
# (a server keeps them as the file has them), one thread (as the servers run)
default_params = lc.llama_model_default_params
def plain_params():
    p = default_params()
    p.use_extra_bufts = False
    return p
lc.llama_model_default_params = plain_params
def run(**kw):
    llm = Llama(model, kv_profile=prof, n_ctx=256, n_batch=64, n_threads=1, logits_all=True, verbose=False, **kw)
    toks = llm.tokenize(b"The capital of France is Paris. The capital of Italy is")
    llm.eval(toks)
    out = np.array(llm.scores[:llm.n_tokens]), llm.kv_layer_info()
    llm.close()
    return out
try:
    local, _ = run()
    remote, layers = run(rpc_servers=rpc, n_gpu_layers=99)
except ProfileError as e:
    print(json.dumps({"refused": str(e)}))
    sys.exit(0)
print(json.dumps({"max_diff": float(np.abs(local - remote).max()), "scale": float(np.abs(local).max()),
                  "top1_same": bool((local.argmax(1) == remote.argmax(1)).all()), "layers": layers,
                  "by_device": runtime.kv_bytes_by_device(layers)}))
"""


def _child(gemma, prof, rpc) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, str(gemma), str(prof), rpc], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_mixed_profile_over_two_rpc_servers_matches_the_local_run(gemma, gemma_mixed, two_servers):
    path, p = gemma_mixed
    res = _child(gemma, path, ",".join(s.endpoint for s in two_servers))
    assert "refused" not in res, res
    assert res["top1_same"] and res["max_diff"] == 0.0, res  # the same kernels elsewhere: the same logits, exactly
    layers = res["layers"]
    assert [(r["type_k"], r["type_v"]) for r in layers] == list(zip(p.type_k, p.type_v))
    # each layer's cache in its own type on the server holding the layer: both servers hold some
    hosts = {r["device_description"] for r in layers}
    assert hosts == {s.endpoint for s in two_servers}, layers
    assert all(r["device"].startswith("RPC") for r in layers)
    assert sum(res["by_device"].values()) == sum(r["bytes_k"] + r["bytes_v"] for r in layers)
    assert len(res["by_device"]) == 2


@pytest.fixture
def old_server(tmp_path):
    """An rpc-server as a client sees one built before our types (OldServerProxy)."""
    server = RpcServer(tmp_path / "rpc-old.log")
    proxy = OldServerProxy(server.port)
    yield proxy
    proxy.close()
    server.stop()


def test_a_server_without_our_types_is_refused_by_name(gemma, gemma_mixed, old_server):
    res = _child(gemma, gemma_mixed[0], old_server.endpoint)
    assert "refused" in res, res
    msg = res["refused"]
    assert old_server.endpoint in msg and "qaq-gguf rpc-server" in msg and ("qaq4l" in msg or "qaq3" in msg), msg


def test_a_profile_of_ggml_types_runs_on_an_older_server(gemma, gemma_ident, old_server, tmp_path):
    """The refusal is about the types: q8_0/q4_0 layers run on the same older server."""
    from qaq_gguf import profile

    path = profile.write_profile(profile.make_profile(gemma_ident, "q8_0", "q4_0"), tmp_path / "ggml.gguf")
    res = _child(gemma, path, old_server.endpoint)
    assert "refused" not in res and res["top1_same"], res


def test_llama_server_with_rpc_reports_each_layers_device(gemma, gemma_mixed, two_servers, server_factory):
    path, p = gemma_mixed
    s = server_factory(["-m", str(gemma), "-c", "512", "-t", "2", "-np", "1", "-ngl", "99",
                        "--rpc", ",".join(x.endpoint for x in two_servers), "--kv-profile", str(path)])
    s.wait_ready(180)
    res = s.post("/completion", {"prompt": "The capital of France is", "n_predict": 6, "temperature": 0})
    assert res["content"].strip()
    layers = s.get("/props")[2]["kv_cache"]["layers"]
    assert [(r["type_k"], r["type_v"]) for r in layers] == list(zip(p.type_k, p.type_v))
    assert {r["device_description"] for r in layers} == {x.endpoint for x in two_servers}


def test_profile_inspect_reports_bytes_per_rpc_server(gemma, gemma_mixed, two_servers):
    path, _ = gemma_mixed
    rpc = ",".join(s.endpoint for s in two_servers)
    r = subprocess.run([sys.executable, "-m", "qaq_gguf.cli", "profile", "inspect", str(path), "--model", str(gemma),
                        "--rpc", rpc, "--n-ctx", "4096", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    by_dev = info["kv_bytes_by_device"]
    assert sum(by_dev.values()) == info["kv_bytes"]
    assert {d.split("(")[1].rstrip(")") for d in by_dev} == {s.endpoint for s in two_servers}, by_dev


def test_exact_cells_on_an_rpc_device_are_refused_by_name(gemma, gemma_ident, two_servers, tmp_path):
    """Exact KV cells are read by the CPU backend's flash attention only: a cache offloaded to another device (an
    RPC server here, a GPU alike) is refused when the context is created, naming the layer and the device."""
    p = profile.make_profile(gemma_ident, "q8_0", "q8_0")
    p.exact_cells = 4
    prof = profile.write_profile(p, tmp_path / "exact.gguf")
    res = _child(gemma, prof, two_servers[0].endpoint)
    assert "refused" in res, res
    assert "keeps the first 4 cells exact, which only the CPU backend reads" in res["refused"], res
    assert "RPC" in res["refused"] and "--no-kv-offload" in res["refused"], res
