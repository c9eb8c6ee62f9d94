"""Collect per-layer attention activations through llama.cpp itself, chunk by chunk.

The model runs on calibration text with an f16 KV cache and flash attention off (so the attention probabilities
exist as a tensor), and an eval callback — the mechanism llama.cpp's imatrix tool uses — copies out, for every
layer, the tensors the QAQ error model needs:

- ``Qcur-<il>``: queries as fed to attention (post-norm, post-RoPE), ``(n_tokens, n_head, head_dim)``;
- ``Kcur-<il>``: keys as written to the cache (post-norm, post-RoPE), ``(n_tokens, n_head_kv, head_dim)``;
- ``Vcur-<il>``: values, ``(n_tokens, n_head_kv, head_dim_v)``;
- ``kq_soft_max-<il>``: attention probabilities ``(n_head, n_tokens, n_kv)``, masks (causal, sliding window)
  and soft-capping applied exactly as the model does.

Each chunk of ``n_ctx`` tokens is decoded as one micro-batch on an empty cache, so cache cell ``t`` holds token
``t`` and every query sees its whole causal context. :func:`iter_chunks` yields one chunk's activations at a time
and drops them before the next: memory is bounded by one chunk whatever the text length.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import llama, runtime, tensors

WANTED = ("Qcur", "Kcur", "Vcur", "kq_soft_max")
_NAME = re.compile(r"^(Qcur|Kcur|Vcur|kq_soft_max)-(\d+)$")


@dataclass
class LayerActivations:
    """One layer's activations over one chunk (see the module docstring for the shapes)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    attn: np.ndarray


def iter_chunks(model_path: str | Path, text: str | Sequence[str], *, n_ctx: int = 512,
                n_chunks: int | None = None, layers: Sequence[int] | None = None, n_threads: int | None = None,
                verbose: bool = False) -> Iterator[dict[int, LayerActivations]]:
    """Run ``model_path`` over ``text`` in chunks of ``n_ctx`` tokens (the first replaced by BOS when the model
    adds one; a list of documents gives one chunk each, from its start) and yield, per chunk,
    ``{layer: LayerActivations}`` for ``layers`` (default: all with a KV cache).

    The cache is f16, flash attention off (so ``kq_soft_max`` exists), one micro-batch per chunk."""
    with llama.quiet_llama_log(verbose):
        yield from _iter_chunks(model_path, text, n_ctx=n_ctx, n_chunks=n_chunks, layers=layers,
                                n_threads=n_threads)


def _iter_chunks(model_path, text, *, n_ctx, n_chunks, layers, n_threads):
    import os

    import llama_cpp as lc

    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = lc.llama_model_load_from_file(str(model_path).encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path}")
    runtime.clear_profile(model)  # calibration measures the plain f16 cache, whatever profile the file carries
    ctx = None
    try:
        vocab = lc.llama_model_get_vocab(model)
        chunks = _chunk_tokens(model, vocab, text, n_ctx, n_chunks)
        n = len(chunks)
        want_layers = set(layers) if layers is not None else None
        got: dict[tuple[str, int], np.ndarray] = {}
        ggml = tensors.ggml_lib()

        def on_tensor(t, ask, user):
            name = ggml.ggml_get_name(t).decode(errors="replace")
            m = _NAME.match(name)
            if not m or (want_layers is not None and int(m.group(2)) not in want_layers):
                return not ask  # ask: not interested; data: keep going
            if ask:
                return True
            got[(m.group(1), int(m.group(2)))] = tensors.read(ggml, t)  # the last Qcur/Kcur is the post-RoPE one
            return True

        cb = lc.ggml_backend_sched_eval_callback(on_tensor)
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = n_ctx
        cp.n_seq_max = 1
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.type_k = cp.type_v = tensors.GGML_TYPE_F16
        cp.swa_full = True
        threads = n_threads or max(1, os.cpu_count() or 1)
        cp.n_threads = cp.n_threads_batch = threads
        cp.cb_eval = cb
        cp.cb_eval_user_data = None
        ctx = lc.llama_init_from_model(model, cp)
        if not ctx:
            raise RuntimeError("llama.cpp could not create the calibration context")
        batch = lc.llama_batch_init(n_ctx, 0, 1)
        try:
            for c, chunk in enumerate(chunks):
                batch.n_tokens = n_ctx
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = i == n_ctx - 1
                lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
                got.clear()
                rc = lc.llama_decode(ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed ({rc}) on calibration chunk {c}")
                yield _assemble(got, n_ctx)
                got.clear()
        finally:
            lc.llama_batch_free(batch)
        del cb
    finally:
        if ctx:
            lc.llama_free(ctx)
        lc.llama_model_free(model)


def _chunk_tokens(model, vocab, text: str | Sequence[str], n_ctx: int, n_chunks: int | None) -> list[list[int]]:
    """The chunks' tokens: consecutive slices of one text (the first token replaced by BOS when the model adds
    one), or the first n_ctx tokens of each document of a list (tokenized as the model would be prompted: BOS
    when the model adds one, special tokens parsed), e.g. chats that start where a chat starts."""
    import llama_cpp as lc

    if isinstance(text, str):
        tokens = llama.tokenize(model, text, add_special=False, parse_special=True)
        n_avail = len(tokens) // n_ctx
        if n_avail < 1:
            raise ValueError(f"the calibration text has {len(tokens)} tokens; one chunk needs {n_ctx} "
                             f"(give more text or a smaller n_ctx)")
        n = n_avail if n_chunks is None else min(n_chunks, n_avail)
        chunks = [tokens[c * n_ctx:(c + 1) * n_ctx] for c in range(n)]
        if lc.llama_vocab_get_add_bos(vocab):
            for chunk in chunks:
                chunk[0] = lc.llama_vocab_bos(vocab)
        return chunks
    chunks = []
    for doc in text:
        tokens = llama.tokenize(model, doc, add_special=True, parse_special=True)
        if len(tokens) < n_ctx:
            raise ValueError(f"a calibration document has {len(tokens)} tokens; a chunk needs {n_ctx}")
        chunks.append(tokens[:n_ctx])
    return chunks if n_chunks is None else chunks[:n_chunks]


def _assemble(got: dict[tuple[str, int], np.ndarray], n_tok: int) -> dict[int, LayerActivations]:
    out = {}
    for il in sorted({il for _, il in got}):
        parts = {w: got.get((w, il)) for w in WANTED}
        missing = [w for w, a in parts.items() if a is None]
        if missing:
            raise RuntimeError(f"layer {il}: the graph produced no {', '.join(missing)} tensor; this architecture "
                               "names its attention tensors differently (calibration supports llama.cpp's "
                               "standard attention graph)")
        q, k, v, a = (parts[w] for w in WANTED)
        # (1, n_tok, n_head, D) -> (n_tok, n_head, D); attn (1, n_head, n_tok, n_kv) -> (n_head, n_tok, n_tok)
        out[il] = LayerActivations(q.reshape(q.shape[-3:]), k.reshape(k.shape[-3:]), v.reshape(v.shape[-3:]),
                                   a.reshape(a.shape[-3:])[:, :, :n_tok])
    return out


def estimate_kq_scale(act: LayerActivations, n_rows: int = 64) -> float:
    """The logit scale ``s`` with ``attn = softmax(s * q.k + mask)``, fitted on the observed probabilities.

    Models differ in where the ``1/sqrt(d)`` goes (Gemma 3 pre-scales Q after the ``Qcur`` tensor, most models
    pass it to the attention): a least-squares fit of ``log p`` against ``q.k`` over visible keys recovers it."""
    n_q, n_head, _ = act.q.shape
    group = n_head // act.k.shape[1]
    rows = np.linspace(n_q // 4, n_q - 1, num=min(n_rows, n_q), dtype=int)
    num = den = 0.0
    for h in range(n_head):
        z = act.q[rows, h, :] @ act.k[:, h // group, :].T  # (rows, n_kv)
        p = act.attn[h][rows]
        for i in range(len(rows)):
            m = p[i] > 1e-6
            if m.sum() < 3:
                continue
            lz = z[i, m] - z[i, m].mean()
            lp = np.log(p[i, m]) - np.log(p[i, m]).mean()
            num += float(lz @ lp)
            den += float(lz @ lz)
    return num / den if den > 0 else 1.0
