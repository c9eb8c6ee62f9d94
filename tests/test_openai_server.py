"""llama-cpp-python's OpenAI-compatible server with a KV profile: our wrapper (qaq_gguf.openai_server, per-layer
types in /v1/models) and plain `python -m llama_cpp.server` on a model with an embedded profile."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from qaq_gguf import profile
from qaq_gguf.server import Server

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "sse_starlette", "starlette_context")),
    reason="llama-cpp-python's server needs its extras: pip install 'qaq-gguf[test]' (or 'llama-cpp-python[server]')")

CHAT = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 12, "temperature": 0}


def _streamed_text(s: Server) -> str:
    events = s.stream("/v1/chat/completions", CHAT)
    pieces = [e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")]
    assert sum(1 for x in pieces if x) >= 2, events  # streamed: the reply arrives in several chunks
    return "".join(pieces)


def test_openai_server_serves_a_profile_and_reports_its_layers(gemma, gemma_mixed, tmp_path):
    path, p = gemma_mixed
    args = ["--model", str(gemma), "--kv_profile", str(path), "--n_ctx", "512", "--chat_format", "gemma",
            "--n_threads", "2"]
    with Server.python_openai(args, tmp_path / "oai.log") as s:
        s.wait_ready(180)
        assert _streamed_text(s).strip()
        models = s.get("/v1/models")[2]["data"]
        kv = models[0]["kv_cache"]
        assert kv["profile"] == str(path)
        assert [(r["type_k"], r["type_v"]) for r in kv["layers"]] == list(zip(p.type_k, p.type_v))
        assert kv["bytes"] == sum(r["bytes_k"] + r["bytes_v"] for r in kv["layers"]) > 0
        assert 4 < kv["avg_bits"] < 8
        # a non-streamed answer too, and the same greedy text
        res = s.post("/v1/chat/completions", CHAT)
        assert res["choices"][0]["message"]["content"].strip()


def test_openai_server_refuses_a_profile_for_another_model(tiny_model, gemma_mixed, tmp_path):
    path, _ = gemma_mixed
    s = Server.python_openai(["--model", str(tiny_model), "--kv_profile", str(path)], tmp_path / "bad.log")
    with pytest.raises(RuntimeError, match="exited"):
        s.wait_ready(120)
    log = s.log.read_text()
    assert "ProfileError" in log and "profile" in log.split("ProfileError", 1)[1], log[-2000:]


def test_plain_llama_cpp_server_runs_an_embedded_profile(gemma, gemma_mixed, tmp_path):
    """`python -m llama_cpp.server` itself, no qaq-gguf code in the command: the embedded profile applies on load
    (flash attention turned on for its quantized V), and the chat streams."""
    _, p = gemma_mixed
    model = profile.embed_profile(gemma, p, tmp_path / "gemma-qaq.gguf")
    s = Server([f"--model={model}", "--n_ctx=512", "--chat_format=gemma", "--n_threads=2"], tmp_path / "plain.log",
               [sys.executable, "-m", "llama_cpp.server"])
    s.health = "/v1/models"
    with s:
        s.wait_ready(180)
        assert _streamed_text(s).strip()
    log = s.log.read_text()
    assert "qaq-gguf: KV cache profile embedded in the model applied" in log, log[-3000:]  # the one line logged


def test_an_instruct_model_answers_through_its_own_chat_template(smollm2, tmp_path):
    """SmolLM2-135M-Instruct (Llama, GQA, head 64, no BOS) with a per-layer profile of our head-64 types: the
    OpenAI server formats the chat with the template in the GGUF and the model answers."""
    ident = profile.model_identity(smollm2)
    n = ident.n_layer
    p = profile.make_profile(ident, ["q8_0" if i % 2 else "qaq3" for i in range(n)], ["q4_0"] * n, {"method": "test"})
    path = profile.write_profile(p, tmp_path / "smol.gguf")
    args = ["--model", str(smollm2), "--kv_profile", str(path), "--n_ctx", "1024", "--n_threads", "2"]
    chat = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24,
            "temperature": 0}
    with Server.python_openai(args, tmp_path / "oai-smol.log") as s:
        s.wait_ready(180)
        answer = s.post("/v1/chat/completions", chat)["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer
        kv = s.get("/v1/models")[2]["data"][0]["kv_cache"]
        assert [(r["type_k"], r["type_v"]) for r in kv["layers"]] == list(zip(p.type_k, p.type_v))
