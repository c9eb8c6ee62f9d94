"""Chat-shaped text: conversations in the model's own chat template, for calibration and evaluation.

Chat apps run an instruct model through its chat template: special tokens first, the user's turn, then the
assistant's. A cache profile calibrated and measured only on plain text can lose exactly there (a 4.5-bit profile
that answered in loops on SmolLM2-135M-Instruct while its plain-text KLD looked fine), so both sides see chats:

- ``prompts(kind)``: the packaged prompt sets (``data/chat-prompts.json``: ``calibration`` and ``evaluation``,
  no prompt shared);
- ``conversations(model, prompts)``: each prompt answered greedily by the model on the f16 cache, as token ids
  in the model's template (llama.cpp's ``llama_chat_apply_template``, what llama-server applies without
  ``--jinja``), with where the answer starts;
- ``chat_text(convs)``: the conversations as one text with their special tokens, for calibration.

A model without a chat template has no chats: :func:`template` returns None and callers skip the chat part.
"""
from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import llama
from .progress import progress_bar

PROMPTS = Path(__file__).resolve().parent / "data" / "chat-prompts.json"


@dataclass
class Conversation:
    """One user prompt and the f16 model's greedy answer: ``tokens`` (template, prompt, answer, end of turn
    when the model ended it) and ``answer_from``, the index of the answer's first token."""

    prompt: str
    tokens: list[int]
    answer_from: int
    text: str  # the whole conversation as text, special tokens included
    n_answer: int = 0  # the answer's tokens, the end of turn left out


def prompts(kind: str) -> list[str]:
    """The packaged prompts of one set: ``"calibration"`` or ``"evaluation"``."""
    data = json.loads(PROMPTS.read_text())
    if kind not in ("calibration", "evaluation"):
        raise ValueError(f"unknown prompt set {kind!r} (calibration, evaluation)")
    return list(data[kind])


def template(model) -> str | None:
    """The model's chat template (its GGUF's tokenizer.chat_template), or None."""
    lc = llama.llama_cpp_module()
    t = lc.llama_model_chat_template(model, None)
    return t.decode() if t else None


def format_chat(tmpl: str, messages: Sequence[tuple[str, str]], add_assistant: bool) -> str:
    """``messages`` ((role, content), ...) in template ``tmpl``; ``add_assistant`` ends with the assistant's turn
    opening. ValueError when llama.cpp does not know the template."""
    lc = llama.llama_cpp_module()
    msgs = (lc.llama_chat_message * len(messages))()
    keep = []
    for m, (role, content) in zip(msgs, messages):
        r, c = role.encode(), content.encode()
        keep += [r, c]
        m.role, m.content = r, c
    size = 2 * sum(len(c) for c in keep) + 256
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = lc.llama_chat_apply_template(tmpl.encode(), msgs, len(messages), add_assistant, buf, size)
        if n < 0:
            raise ValueError("llama.cpp does not know this model's chat template (llama_chat_apply_template)")
        if n <= size:
            return buf.raw[:n].decode(errors="replace")
        size = n + 1
    raise RuntimeError("llama_chat_apply_template kept asking for a larger buffer")


class _Answerer:
    """The model on the f16 cache (no profile; or the cache ``llama_kw`` asks for), answering prompts greedily in
    its own chat template."""

    def __init__(self, model_path: str | Path, max_tokens: int, n_threads: int | None, **llama_kw):
        from .runtime import Llama

        self.max_tokens = max_tokens
        llama_kw.setdefault("kv_profile", None)
        self.llm = Llama(str(model_path), n_ctx=max(512, max_tokens + 384), n_batch=512, n_threads=n_threads,
                         verbose=False, **llama_kw)
        self.tmpl = template(self.llm.model)
        lc = llama.llama_cpp_module()
        self.vocab = lc.llama_model_get_vocab(self.llm.model)
        self.is_eog = lc.llama_vocab_is_eog

    def __call__(self, prompt: str) -> Conversation:
        head = format_chat(self.tmpl, [("user", prompt)], add_assistant=True)
        toks = llama.tokenize(self.llm.model, head, add_special=True, parse_special=True)
        answer: list[int] = []
        ended = False
        for t in self.llm.generate(toks, temp=0.0, top_k=1, reset=True):
            answer.append(int(t))
            ended = bool(self.is_eog(self.vocab, t))
            if ended or len(answer) >= self.max_tokens:
                break
        text = head + self.llm.detokenize(answer, special=True).decode(errors="replace")
        return Conversation(prompt, toks + answer, len(toks), text, len(answer) - ended)

    def close(self) -> None:
        self.llm.close()


def conversations(model_path: str | Path, prompt_list: Sequence[str], *, max_tokens: int = 128,
                  n_threads: int | None = None, progress: bool = True, **llama_kw) -> list[Conversation]:
    """Each prompt answered greedily by the model in its chat template, on the f16 cache (no profile) unless
    ``llama_kw`` asks for another cache. Empty when the model has no chat template."""
    ans = _Answerer(model_path, max_tokens, n_threads, **llama_kw)
    try:
        if ans.tmpl is None:
            return []
        bar = progress_bar(progress, len(prompt_list), "chat answers", unit="prompt")
        out = []
        for p in prompt_list:
            out.append(ans(p))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return out
    finally:
        ans.close()


def chat_text(convs: Sequence[Conversation]) -> str:
    """The conversations as one text, special tokens included (tokenize it with parse_special)."""
    return "".join(c.text for c in convs)


def calibration_documents(model_path: str | Path, n_docs: int, n_ctx: int, *, max_tokens: int = 128,
                          n_threads: int | None = None, progress: bool = True) -> list[str]:
    """Up to ``n_docs`` documents of at least ``n_ctx`` tokens, each whole conversations (the calibration prompts
    answered by the model itself, in its template) starting where a chat starts: fewer when the prompts run out,
    none when the model has no chat template. Only the prompts needed are answered."""
    if n_docs <= 0:
        return []
    ans = _Answerer(model_path, max_tokens, n_threads)
    try:
        if ans.tmpl is None:
            return []
        docs: list[str] = []
        doc: list[Conversation] = []
        bar = progress_bar(progress, n_docs, "chat calibration text", unit="chunk")
        for p in prompts("calibration"):
            doc.append(ans(p))
            if sum(len(c.tokens) for c in doc) >= n_ctx + 32:  # room for re-tokenizing the joined text
                docs.append(chat_text(doc))
                doc = []
                if bar is not None:
                    bar.update(1)
                if len(docs) == n_docs:
                    break
        if bar is not None:
            bar.close()
        return docs
    finally:
        ans.close()


def repetition(tokens: Sequence[int], n: int = 4) -> float:
    """The share of an answer's n-grams that repeat an earlier one: 0 for no repetition, near 1 for a loop
    (``1. **101:1111111...``). Greedy answers of small models repeat a little on their own; compare with f16's."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def greedy_answers(model_path: str | Path, prompt_list: Sequence[str], *, kv_profile: str | Path | None = None,
                   type_k: str | None = None, type_v: str | None = None, max_tokens: int = 128,
                   n_threads: int | None = None) -> list[list[int]]:
    """Each prompt answered greedily by the model with a cache profile or a uniform -ctk/-ctv pair (f16 without
    either): the answers' tokens (end of turn left out), for checking that a profile does not send the model into
    loops."""
    from . import cachetypes

    kw: dict = {"kv_profile": str(kv_profile) if kv_profile else None}
    if type_k or type_v:
        kw.update(type_k=cachetypes.get(type_k or "f16").type_id, type_v=cachetypes.get(type_v or "f16").type_id,
                  flash_attn=True)
    convs = conversations(model_path, prompt_list, max_tokens=max_tokens, n_threads=n_threads, progress=False, **kw)
    if not convs:
        raise ValueError(f"{model_path} has no chat template")
    return [c.tokens[c.answer_from:c.answer_from + c.n_answer] for c in convs]
