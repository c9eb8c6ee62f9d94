"""Chat is the use: conversations in the model's own template for calibration and for evaluation (SmolLM2, no BOS)."""
from __future__ import annotations

import numpy as np
import pytest

from qaq_gguf import calibrate, chat, evaluate, profile


def test_prompt_sets_are_disjoint():
    cal, ev = chat.prompts("calibration"), chat.prompts("evaluation")
    assert len(cal) >= 16 and len(ev) >= 8 and not set(cal) & set(ev)
    with pytest.raises(ValueError, match="unknown prompt set"):
        chat.prompts("test")


def test_repetition():
    assert chat.repetition(list(range(40))) == 0.0
    assert chat.repetition([1, 2, 3] + [7] * 40) >= 0.9
    assert chat.repetition([1, 2]) == 0.0


def test_conversations_follow_the_template(smollm2):
    convs = chat.conversations(smollm2, ["What is two plus two?"], max_tokens=16, progress=False)
    (c,) = convs
    assert c.text.startswith("<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n")
    assert 0 < c.answer_from < len(c.tokens) <= c.answer_from + 16
    assert c.tokens[0] != c.tokens[1]  # no BOS was added: SmolLM2 has none


def test_chat_evaluation_scores_the_answers(smollm2):
    prompts = ["Name a color.", "What is rain?"]
    res = evaluate.evaluate_chat(smollm2, [evaluate.CacheConfig("f16", type_k="f16", type_v="f16"),
                                           evaluate.CacheConfig("q4_0", type_k="q4_0", type_v="q4_0")],
                                 prompts=prompts, max_tokens=24, n_threads=2, progress=False)
    convs = chat.conversations(smollm2, prompts, max_tokens=24, progress=False)
    s = res["settings"]
    assert s["n_chunks"] == 2 and s["text"] == "chat (2 conversations)"
    # every answer token is scored, from the position before the answer's first token
    assert s["n_tokens_scored"] == sum(len(c.tokens) - c.answer_from for c in convs)
    f16, q4 = res["results"]
    assert f16["kld"] == pytest.approx(0.0, abs=1e-6) and f16["top1"] == 100.0
    assert q4["kld"] > 1e-4 and np.isfinite(q4["kld"])
    assert "chat (2 conversations)" in evaluate.format_table(res)


def test_default_calibration_includes_chat_and_keeps_its_first_token_exact(smollm2, calib_text):
    """SmolLM2 adds no BOS: plain-text chunks start anywhere, so the first token kept exact is the one every chat
    starts with (<|im_start|>); the chat chunks are part of the default."""
    s = calibrate.calibrate(smollm2, calib_text, n_ctx=128, n_chunks=4, n_threads=2, progress=False,
                            candidates=["f16", "q8_0", "q4_0", "qaq3"])
    assert s.settings["chat_chunks"] == 1 and s.settings["n_chunks"] == 5
    assert s.settings["exact_first"] and s.settings["exact_first_token"] == "chat"
    assert s.k_first is not None and np.isfinite(s.k_first).all()
    p = calibrate.allocate(s, avg_bits=5.0)
    assert p.provenance["calib_chat_chunks"] == 1
    plain = calibrate.calibrate(smollm2, calib_text, n_ctx=128, n_chunks=2, chat_chunks=0, n_threads=2,
                                progress=False, candidates=["f16", "q4_0"])
    assert not plain.settings["exact_first"] and plain.settings["chat_chunks"] == 0


def test_calibrated_profile_does_not_loop_in_chat(smollm2, tmp_path):
    """The greedy-chat check: a profile's answers repeat no more than the f16 cache's (the 4.5-bit profile of the
    issue answered '1. **101:1111111...')."""
    from pathlib import Path

    f = Path(__file__).resolve().parent.parent / "docs" / "results" / "smollm2" / "qaq-4.5bits.gguf"
    if not f.is_file():
        pytest.fail(f"{f} is missing: the SmolLM2 frontier's 4.5-bit profile is what this test checks")
    prompts = chat.prompts("evaluation")[:4]
    ref = chat.greedy_answers(smollm2, prompts, max_tokens=64, n_threads=2)
    got = chat.greedy_answers(smollm2, prompts, kv_profile=f, max_tokens=64, n_threads=2)
    for p, a, b in zip(prompts, ref, got):
        assert chat.repetition(b) <= chat.repetition(a) + 0.25, (p, chat.repetition(a), chat.repetition(b))
    assert profile.average_bits(profile.read_profile(f)) <= 4.5 + 1e-9


def test_llama_server_chats_through_the_models_template(smollm2, server_factory, tmp_path):
    """llama-server with --kv-profile on the instruct model: /v1/chat/completions applies the GGUF's chat template
    and the model answers; /props lists the per-layer types."""
    ident = profile.model_identity(smollm2)
    n = ident.n_layer
    p = profile.make_profile(ident, ["qaq4h" if i % 2 else "q8_0" for i in range(n)], ["qaq4h"] * n,
                             {"method": "test"})
    path = profile.write_profile(p, tmp_path / "smol.gguf")
    s = server_factory(["-m", str(smollm2), "-c", "1024", "-t", "2", "-np", "1", "--kv-profile", str(path)])
    s.wait_ready()
    res = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                          "max_tokens": 24, "temperature": 0})
    assert "Paris" in res["choices"][0]["message"]["content"], res
    layers = s.get("/props")[2]["kv_cache"]["layers"]
    assert [(r["type_k"], r["type_v"]) for r in layers] == list(zip(p.type_k, p.type_v))
