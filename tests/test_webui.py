"""llama-server's web chat, served with --kv-profile, used in a real (headless) Chromium: a message typed into the
chat box gets a streamed reply. Skips, saying why, where no Chromium or no websocket-client is installed
(.ci/run installs Chromium from the distribution's packages when it can)."""
from __future__ import annotations

import importlib.util
import time

import pytest

from browser import Browser, find_chromium

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("websocket") is None,
                       reason="the browser test needs websocket-client: pip install 'qaq-gguf[test]'"),
    pytest.mark.skipif(find_chromium() is None,
                       reason="no Chromium to drive: apt-get install chromium-headless-shell (or set QAQ_CHROMIUM)"),
]

# the chat box and its messages in llama-server's Svelte UI (tools/ui): the textarea of ChatFormInputBasic, and
# the .chat-message blocks of ChatMessages
TEXTAREA = "document.querySelector('textarea')"
MESSAGES = "Array.from(document.querySelectorAll('.chat-message')).map(e => e.innerText.trim())"


def _chat(s, tmp_path) -> str:
    """Type a message into the web chat of server s; the streamed reply (asserted to have streamed)."""
    with Browser.launch(tmp_path) as b:
        b.navigate(s.url + "/")
        b.wait_for(f"{TEXTAREA} !== null && !{TEXTAREA}.disabled", timeout=60)
        b.eval(f"{TEXTAREA}.focus()")
        b.type_text("Write one sentence about the sea.")
        b.press_enter()
        # the reply grows in place while tokens stream in: record the assistant text until it stops changing
        seen: list[str] = []
        t0 = time.time()
        last_change = time.time()
        while time.time() - t0 < 240:
            msgs = b.eval(MESSAGES) or []
            reply = msgs[-1] if len(msgs) >= 2 else ""
            if reply and (not seen or reply != seen[-1]):
                seen.append(reply)
                last_change = time.time()
            elif seen and time.time() - last_change > 5 and not b.eval(_GENERATING):
                break
            time.sleep(0.05)
        assert len(b.eval(MESSAGES)) >= 2, b.eval("document.body.innerText")[-2000:]
        assert seen and seen[-1].strip(), b.eval("document.body.innerText")[-2000:]
        assert len(set(seen)) >= 3, seen  # streamed: the page showed the reply growing, not all at once
    assert "processing task" in s.log.read_text()  # the reply came from this server's slot
    return seen[-1]


def test_web_chat_streams_a_reply_with_a_profile(gemma, gemma_mixed, server_factory, tmp_path):
    path, p = gemma_mixed
    s = server_factory(["-m", str(gemma), "-c", "1024", "-t", "2", "-np", "1", "-n", "48",
                        "--kv-profile", str(path)])
    s.wait_ready()
    assert [(r["type_k"], r["type_v"]) for r in s.get("/props")[2]["kv_cache"]["layers"]] == \
        list(zip(p.type_k, p.type_v))
    _chat(s, tmp_path)


def test_web_chat_with_an_instruct_model_and_exact_cells(smollm2, server_factory, tmp_path):
    """SmolLM2-135M-Instruct answers in its own chat template, its cache in head-64 types with the first cells
    exact (flash attention on by default, the cache on the CPU)."""
    from qaq_gguf import profile

    p = profile.make_profile(profile.model_identity(smollm2), "qaq4h", "qaq3h")
    p.exact_cells = 4
    path = profile.write_profile(p, tmp_path / "smol.gguf")
    s = server_factory(["-m", str(smollm2), "-c", "1024", "-t", "2", "-np", "1", "-n", "48",
                        "--kv-profile", str(path)])
    s.wait_ready()
    layers = s.get("/props")[2]["kv_cache"]["layers"]
    assert {(r["type_k"], r["type_v"]) for r in layers} == {("qaq4h", "qaq3h")}
    # the exact cells' f16 rows are in the cache this server allocated
    assert sum(r["bytes_k"] + r["bytes_v"] for r in layers) == profile.kv_bytes(p, 1024)
    reply = _chat(s, tmp_path)
    assert len(reply.split()) >= 4, reply  # an answer in words, not a loop of one token


# true while the UI shows a stop button (a reply is still being generated)
_GENERATING = "!!document.querySelector('button[aria-label*=\"Stop\" i], button[title*=\"Stop\" i]')"
