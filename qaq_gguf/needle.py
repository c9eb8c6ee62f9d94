"""Long-context retrieval per KV cache config: needles in a haystack and pass keys, the f16 cache in the same run.

A case is one context of `length` tokens: BOS, a haystack, and one needle ("The special magic number for Lisbon is
4825193.") at each requested depth (0 = right after BOS, 1 = just before the question), then a question for one of
the needles. The context is decoded once per config; each needle's question is then decoded after it (the previous
question removed from the cache) and answered greedily, so a depth x length grid costs one prefill per length, not
one per cell (RULER's multi-key needle: the other needles are distractors). An answer is right when the first number
it contains is the needle's.

Two haystacks: ``niah`` (real text, e.g. WikiText-2 test, cut at sentence ends) and ``passkey`` (the repeated
"The grass is green. The sky is blue. ..." filler of Mohtashami & Jaggi's pass-key test, keys named by box number).

    from qaq_gguf import needle
    from qaq_gguf.evaluate import CacheConfig
    res = needle.run("model.gguf", [CacheConfig("q4_0", type_k="q4_0", type_v="q4_0")], kind="niah",
                     lengths=[4096, 16384], depths=needle.depth_grid(5), haystack=text)
    print(needle.table(res))
"""
from __future__ import annotations

import ctypes
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import evaluate, llama, runtime
from .progress import progress_bar
from .evaluate import CacheConfig

KINDS = ("niah", "passkey")
MAX_ANSWER_TOKENS = 12
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
_KEYS = ("Lisbon", "Nairobi", "Oslo", "Quito", "Hanoi", "Dakar", "Lima", "Tbilisi", "Havana", "Riga", "Accra",
         "Manila", "Bogota", "Tunis", "Zagreb", "Perth", "Cusco", "Bergen", "Porto", "Kyoto", "Malmo", "Turin")


@dataclass
class Needle:
    key: str
    value: str
    depth: float        # requested: fraction of the haystack before the needle
    position: int = 0   # token index of the needle's first token in the context
    question: list[int] = field(default_factory=list)


@dataclass
class Case:
    """One context: tokens (BOS first) and its needles, each with the question tokens that follow the context."""
    length: int
    tokens: list[int]
    needles: list[Needle]


def depth_grid(n: int) -> list[float]:
    """n depths from 0 to 1 inclusive (one depth: 0.5)."""
    if n < 1:
        raise ValueError(f"the number of depths must be positive, got {n}")
    return [0.5] if n == 1 else [round(i / (n - 1), 4) for i in range(n)]


def _sentences(text: str) -> list[str]:
    """Text cut after sentence ends and at line ends, each piece keeping its trailing space."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or (line.startswith("=") and line.endswith("=")):  # WikiText headings carry no sentences
            continue
        out += [s + " " for s in re.split(r"(?<=[.!?])\s+", line) if s]
    return out


def _phrases(kind: str, key: str, value: str) -> tuple[str, str]:
    """(needle sentence, question text ending where the answer starts)."""
    if kind == "niah":
        return (f"The special magic number for {key} is {value}. ",
                f"\n\nWhat is the special magic number for {key} mentioned in the text above? "
                f"The special magic number for {key} is")
    return (f"The pass key for box {key} is {value}. Remember it. {value} is the pass key for box {key}. ",
            f"\n\nWhat is the pass key for box {key}? The pass key for box {key} is")


def make_case(tokenize, kind: str, length: int, depths: Sequence[float], haystack: str | None = None,
              seed: int = 0) -> Case:
    """A case of exactly `length` tokens (context plus the longest question and MAX_ANSWER_TOKENS fit in it).

    tokenize(text) -> token ids without BOS; the context starts with bos_token=tokenize.bos when that attribute is
    set. The haystack starts at a seed-chosen sentence (niah) and wraps around; values are seed-chosen 7-digit
    numbers, keys distinct."""
    if kind not in KINDS:
        raise ValueError(f"unknown needle kind {kind!r}: one of {', '.join(KINDS)}")
    if not depths:
        raise ValueError("give at least one depth")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths are fractions in [0, 1], got {list(depths)}")
    n_keys = len(_KEYS) if kind == "niah" else 10**6
    if len(depths) > n_keys:
        raise ValueError(f"at most {n_keys} needles per case, got {len(depths)} depths")
    rng = random.Random(f"{kind}:{length}:{seed}")
    keys = rng.sample(_KEYS, len(depths)) if kind == "niah" else [str(k) for k in rng.sample(range(10, 100),
                                                                                              len(depths))]
    needles = [Needle(k, str(rng.randrange(1_000_000, 10_000_000)), float(d)) for k, d in zip(keys, depths)]
    needle_toks, questions = [], []
    for n in needles:
        text, question = _phrases(kind, n.key, n.value)
        needle_toks.append(tokenize(text))
        n.question = tokenize(question)
    bos = getattr(tokenize, "bos", None)
    head = [bos] if bos is not None else []
    n_body = length - len(head) - max(len(q) for q in (n.question for n in needles)) - MAX_ANSWER_TOKENS
    n_body -= sum(len(t) for t in needle_toks)
    if n_body < 16:
        raise ValueError(f"length {length} leaves no room for a haystack around {len(needles)} needles")

    # the haystack: whole sentences until the body is full, the last one cut to fit
    if kind == "niah":
        if not haystack:
            raise ValueError("a needle-in-a-haystack case needs a haystack text")
        sents = _sentences(haystack)
        if not sents:
            raise ValueError("the haystack text holds no sentences")
        start = rng.randrange(len(sents))
    else:
        sents, start = [PASSKEY_FILLER], 0
    pieces: list[list[int]] = []  # tokens of each sentence, in order
    n = 0
    i = start
    while n < n_body:
        t = tokenize(sents[i % len(sents)])
        pieces.append(t[:n_body - n])
        n += len(pieces[-1])
        i += 1
        if i - start > 10 * len(sents) + n_body:  # text that tokenizes to nothing
            raise ValueError("the haystack text tokenizes to too few tokens")
    bounds = np.cumsum([0] + [len(p) for p in pieces])  # token offset of each sentence start within the body

    # each needle goes in at the sentence boundary nearest to its depth; deeper needles after shallower ones
    order = sorted(range(len(needles)), key=lambda k: needles[k].depth)
    at = {k: int(np.argmin(np.abs(bounds - needles[k].depth * n_body))) for k in order}
    tokens = list(head)
    for s in range(len(pieces) + 1):
        for k in order:
            if at[k] == s:
                needles[k].position = len(tokens)
                tokens += needle_toks[k]
        if s < len(pieces):
            tokens += pieces[s]
    return Case(length, tokens, needles)


def first_number(text: str) -> str | None:
    """The first run of digits in an answer, or None."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def is_correct(answer: str, value: str) -> bool:
    return first_number(answer) == value


# --- running ---------------------------------------------------------------------------------------------------

class _Tokenizer:
    def __init__(self, model, bos: int | None):
        self.model, self.bos = model, bos

    def __call__(self, text: str) -> list[int]:
        return llama.tokenize(self.model, text, add_special=False, parse_special=False)


def _piece(lc, vocab, tok: int) -> str:
    buf = ctypes.create_string_buffer(64)
    n = lc.llama_token_to_piece(vocab, tok, buf, len(buf), 0, False)
    return buf.raw[:max(n, 0)].decode("utf-8", errors="replace")


def _decode_tokens(ctx, batch, tokens: Sequence[int], pos0: int, n_batch: int, n_vocab: int, label: str,
                   errors: list[str]) -> np.ndarray:
    """Decode tokens at pos0.. in batches (evaluate's batch filling and decode); the last token's logits."""
    last = pos0 + len(tokens) - 1
    logits = None
    for a in range(0, len(tokens), n_batch):
        part = list(tokens[a:a + n_batch])
        n_out = evaluate._fill_batch(batch, part, pos0 + a, last, last)
        out = evaluate._decode(ctx, batch, n_out, n_vocab, label, errors)
        if out is not None:
            logits = out[-1]
    return logits


def _answer(ctx, batch, case: Case, needle: Needle, n_vocab: int, vocab, eos: set[int], label: str,
            errors: list[str]) -> str:
    """Greedy answer to a needle's question, decoded after the case's context (already in the cache)."""
    lc = llama.llama_cpp_module()
    mem = lc.llama_get_memory(ctx)
    n = len(case.tokens)
    lc.llama_memory_seq_rm(mem, 0, n, -1)  # the previous question and answer
    logits = _decode_tokens(ctx, batch, needle.question, n, len(needle.question), n_vocab, label, errors)
    pos = n + len(needle.question)
    text = ""
    for _ in range(MAX_ANSWER_TOKENS):
        tok = int(np.argmax(logits))
        if tok in eos:
            break
        piece = _piece(lc, vocab, tok)
        text += piece
        if first_number(text) is not None and not re.search(r"\d$", text):  # the number has ended
            break
        logits = _decode_tokens(ctx, batch, [tok], pos, 1, n_vocab, label, errors)
        pos += 1
    return text.strip()


def run(model_path: str | Path, configs: Sequence[CacheConfig], *, kind: str = "niah",
        lengths: Sequence[int] = (4096, 16384, 32768), depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        haystack: str | None = None, trials: int = 1, n_batch: int = 512, n_threads: int | None = None,
        progress: bool = True, verbose: bool = False, text_name: str | None = None) -> dict:
    """Retrieval accuracy of each config (and of the f16 reference, run first) at each length and depth.

    Every config sees the same cases (trials per length, seeds 0..trials-1). Each runs in one context of
    max(lengths) cells with a full-size cache for sliding-window layers (questions are branched off the context,
    so the window's cells must outlive them; the attention is unchanged). Returns a JSON-serialisable dict:
    {"settings", "configs": [{label, type_k, type_v, profile, avg_bits, kv_bytes, correct, total, accuracy,
    agree_f16, by_length: {L: accuracy}, cells: [{length, trial, depth, position, key, value, answer, correct}]}]}
    with the reference first (label "f16"). Raises ValueError for bad arguments or a length past the model's
    training context, ProfileError for a profile that does not fit, RuntimeError when llama.cpp fails."""
    lc = llama.llama_cpp_module()
    lengths = _check_arguments(configs, lengths, trials)
    n_threads = n_threads or os.cpu_count() or 1
    all_cfgs = [CacheConfig("f16", type_k=evaluate.REFERENCE_TYPE, type_v=evaluate.REFERENCE_TYPE)] + list(configs)
    t0 = time.time()
    out = []
    with llama.quiet_llama_log(verbose) as errors:
        base = evaluate._load_model(model_path, errors=errors)
        try:
            vocab = _Vocab(base, lengths[-1])
            cases = [make_case(vocab.tokenizer, kind, L, depths, haystack, seed) for L in lengths
                     for seed in range(trials)]
            bar = _progress_bar(kind, len(all_cfgs) * sum(case.length for case in cases)) if progress else None
            for cfg in all_cfgs:
                out.append(_run_config(model_path, base, cfg, cases, vocab, lengths[-1], n_batch, n_threads, trials,
                                       errors, bar))
            if bar is not None:
                bar.close()
        finally:
            lc.llama_model_free(base)
    _accuracy(out, lengths)
    settings = {"model": str(model_path), "kind": kind, "lengths": lengths, "depths": [float(d) for d in depths],
                "trials": trials, "haystack": text_name if kind == "niah" else "passkey filler",
                "n_batch": n_batch, "n_threads": n_threads, "swa_full": True, "flash_attn": True,
                "seconds": round(time.time() - t0, 1)}
    return {"settings": settings, "configs": out}


def _check_arguments(configs: Sequence[CacheConfig], lengths: Sequence[int], trials: int) -> list[int]:
    """run()'s arguments checked before the model is loaded; returns the distinct lengths, ascending."""
    lengths = sorted({int(x) for x in lengths})
    if not lengths or lengths[0] < 64:
        raise ValueError(f"lengths must be at least 64 tokens, got {lengths}")
    if trials < 1:
        raise ValueError(f"trials must be positive, got {trials}")
    labels = ["f16"] + [c.label for c in configs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"config labels must be distinct (and not 'f16', the reference): {labels}")
    for c in configs:
        if c.method is not None:
            raise ValueError(f"config {c.label!r}: methods (the lab's rewrites) do not run in the needle test")
        if c.profile is None:
            evaluate._cache_type(c, c.type_k)
            evaluate._cache_type(c, c.type_v)
    return lengths


class _Vocab:
    """What the cases and answers need of the model's vocabulary: its size, BOS (when it adds one), the tokens
    that end an answer, and a tokenizer for make_case; a length past the training context is refused."""

    def __init__(self, model, max_length: int):
        lc = llama.llama_cpp_module()
        self.vocab = lc.llama_model_get_vocab(model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        n_train = int(lc.llama_model_n_ctx_train(model))
        if max_length > n_train:
            raise ValueError(f"length {max_length} is past the model's training context ({n_train})")
        bos = int(lc.llama_vocab_bos(self.vocab)) if lc.llama_vocab_get_add_bos(self.vocab) else None
        self.eos = {int(lc.llama_vocab_eos(self.vocab)), int(lc.llama_vocab_eot(self.vocab))} - {-1}
        self.tokenizer = _Tokenizer(model, bos)


def _progress_bar(kind: str, total: int):
    return progress_bar(True, total, f"{kind} prefill", unit="tok", unit_scale=True)


def _run_config(model_path, base, cfg: CacheConfig, cases: list[Case], vocab: _Vocab, n_ctx: int, n_batch: int,
                n_threads: int, trials: int, errors: list[str], bar) -> dict:
    """One config over every case: its context (on its own copy of the model for a profile), each case's context
    decoded once and each needle's question answered after it; the config's cells and cache."""
    lc = llama.llama_cpp_module()
    model = base
    if cfg.profile is not None:
        model = evaluate._load_model(model_path, errors=errors)
        runtime.apply_profile(model, model_path, cfg.profile)
    ctx = batch = None
    try:
        ctx = evaluate._new_context(model, cfg, n_ctx, n_batch, n_threads, errors, swa_full=True)
        batch = lc.llama_batch_init(n_batch, 0, 1)
        cells = []
        for k, case in enumerate(cases):
            if bar is not None:
                bar.set_postfix_str(f"{cfg.label} @ {case.length}")
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            _decode_tokens(ctx, batch, case.tokens, 0, n_batch, vocab.n_vocab, cfg.label, errors)
            for nd in case.needles:
                ans = _answer(ctx, batch, case, nd, vocab.n_vocab, vocab.vocab, vocab.eos, cfg.label, errors)
                cells.append({"length": case.length, "trial": k % trials, "depth": nd.depth,
                              "position": nd.position, "key": nd.key, "value": nd.value,
                              "answer": ans, "correct": is_correct(ans, nd.value)})
            if bar is not None:
                bar.update(case.length)
        return {"label": cfg.label, "profile": str(cfg.profile) if cfg.profile else None,
                **evaluate.kv_summary(ctx, model), "cells": cells}
    finally:
        if batch is not None:
            lc.llama_batch_free(batch)
        if ctx is not None:
            lc.llama_free(ctx)
        if model is not base:
            lc.llama_model_free(model)


def _accuracy(out: list[dict], lengths: list[int]) -> None:
    """Each config's counts, accuracy (overall and per length) and agreement with the reference (out[0])."""
    ref = out[0]["cells"]
    for r in out:
        cells = r["cells"]
        r["correct"] = sum(c["correct"] for c in cells)
        r["total"] = len(cells)
        r["accuracy"] = 100.0 * r["correct"] / len(cells)
        r["agree_f16"] = 100.0 * sum(a["answer"] == b["answer"] for a, b in zip(cells, ref)) / len(cells)
        r["by_length"] = {str(L): 100.0 * float(np.mean([c["correct"] for c in cells if c["length"] == L]))
                          for L in lengths}


# --- reporting -------------------------------------------------------------------------------------------------

def table(res: dict) -> str:
    """Accuracy per config and length (correct answers out of depths x trials), bits, agreement with f16."""
    s = res["settings"]
    lengths = s["lengths"]
    n_cell = len(s["depths"]) * s["trials"]
    lines = [f"{s['kind']}: {len(s['depths'])} depths x {s['trials']} trial(s) per length, haystack "
             f"{s['haystack']}, greedy, {s['seconds']:.0f} s"]
    hdr = f"{'config':<22} {'bits':>6} " + " ".join(f"{L:>9}" for L in lengths) + f" {'all':>7} {'= f16':>7}"
    lines += [hdr, "-" * len(hdr)]
    for r in res["configs"]:
        label = r["label"] if len(r["label"]) <= 22 else r["label"][:21] + "…"
        per = []
        for L in lengths:
            k = sum(c["correct"] for c in r["cells"] if c["length"] == L)
            per.append(f"{k:>4}/{n_cell:<4}")
        lines.append(f"{label:<22} {r['avg_bits']:>6.2f} " + " ".join(f"{p:>9}" for p in per)
                     + f" {r['accuracy']:>6.1f}% {r['agree_f16']:>6.1f}%")
    return "\n".join(lines)


def plot(res: dict, path: str | Path) -> Path | None:
    """Heat map per config: depth (rows) x length (columns), the fraction of trials answered right."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    s = res["settings"]
    lengths, depths = s["lengths"], s["depths"]
    n = len(res["configs"])
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 + 1.0 * len(lengths) * cols, 1.4 + 0.4 * len(depths) * rows),
                             squeeze=False, sharey=True, layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, r in zip(axes.flat, res["configs"]):
        grid = np.zeros((len(depths), len(lengths)))
        for c in r["cells"]:
            grid[depths.index(c["depth"]), lengths.index(c["length"])] += c["correct"] / s["trials"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(f"{r['label']}\n{r['avg_bits']:.2f} bits, {r['accuracy']:.0f}%", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{L // 1024}k" if L >= 1024 else str(L) for L in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("context", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("needle depth", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="retrieved (fraction of trials)")
    fig.suptitle(f"{s['kind']} retrieval, Gemma 3 270M, greedy" if "gemma" in s["model"].lower()
                 else f"{s['kind']} retrieval, greedy", fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
