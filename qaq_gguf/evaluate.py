"""KV-cache quality the llama.cpp way: perplexity, KL-divergence and top-1 agreement against the f16 cache.

`evaluate()` follows `perplexity()` in llama.cpp's tools/perplexity/perplexity.cpp: the text is tokenized as
`llama-perplexity -f` tokenizes it (`common_tokenize(ctx, text, add_special=true)`: a BOS first when the vocabulary
adds one), cut into chunks of n_ctx tokens whose first token becomes BOS, and each chunk is decoded from an empty
cache in batches of n_batch at positions 0..n_ctx-1. Positions j in [n_ctx/2, n_ctx-2] are scored on token j+1.

Unlike `llama-perplexity --kl-divergence`, which stores the reference log-probabilities of a first run in a file
(n_vocab values per token: 262k for Gemma 3), the reference runs in lockstep: every batch is decoded in the
reference context (f16 K and V) and then in each configuration's context, so only one batch of reference
log-probabilities is held. Every context runs with flash attention on (llama.cpp stores a quantized V cache only
with it), the reference included.

    from qaq_gguf.evaluate import CacheConfig, evaluate, format_table
    res = evaluate("model.gguf", text, [CacheConfig("q8/q4", type_k="q8_0", type_v="q4_0"),
                                        CacheConfig("qaq", profile="qaq.gguf")], n_ctx=1024, n_chunks=8)
    print(format_table(res))
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import cachetypes, llama, profile, rewrite, runtime
from .progress import progress_bar

REFERENCE_TYPE = "f16"
_ROW_BLOCK = 32  # rows of n_vocab processed at once when comparing log-probabilities (bounds temporaries)


@dataclass
class CacheConfig:
    """One KV cache to evaluate: a profile (per-layer types), or one K and one V type for every layer."""
    label: str
    profile: str | None = None  # path of a qaq profile .gguf; when set, type_k/type_v are not used
    type_k: str = "f16"         # llama.cpp cache type names: f16, q8_0, q4_0, ... (qaq_gguf.cachetypes)
    type_v: str = "f16"
    method: object | None = None  # a fitted qaq_gguf.methods method: rewrites Q/K/V over an f16 cache (the lab)


# --- text ------------------------------------------------------------------------------------------------------

def read_text_file(path: str | Path) -> str:
    """A text file as `llama-perplexity -f` reads it: the whole file, one trailing newline dropped."""
    text = Path(path).read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


def tokenize(model, text: str) -> list[int]:
    """Tokens of `text` for a loaded model (ctypes pointer), as perplexity.cpp tokenizes its input:
    special tokens added (a BOS first when the vocabulary adds one), special-token text not parsed."""
    return llama.tokenize(model, text, add_special=True, parse_special=False)


def tokenize_text(model_path: str | Path, text: str) -> list[int]:
    """Tokens of the whole text for the model at model_path (vocabulary-only load), exactly those evaluate() uses:
    a BOS first when the model's vocabulary adds one, as `llama-perplexity` tokenizes its file."""
    lc = llama.llama_cpp_module()
    params = lc.llama_model_default_params()
    params.vocab_only = True
    with llama.quiet_llama_log():
        model = _load_model(model_path, params)
    try:
        return tokenize(model, text)
    finally:
        lc.llama_model_free(model)


# --- llama.cpp plumbing ----------------------------------------------------------------------------------------

def _load_model(model_path: str | Path, params=None, errors: list[str] | None = None):
    lc = llama.llama_cpp_module()
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"model file not found: {model_path}")
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(str(model_path).encode(), params or lc.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path}" + _tail(errors))
    if params is None or not params.vocab_only:
        runtime.clear_profile(model)  # each config sets its own cache; the reference is plain f16
    return model


def _tail(errors: list[str] | None) -> str:
    return (": " + " | ".join(errors[-3:])) if errors else ""


def _cache_type(cfg: CacheConfig, name: str) -> int:
    try:
        return cachetypes.get(name).type_id
    except ValueError as e:
        raise ValueError(f"config {cfg.label!r}: {e}") from None


def _new_context(model, cfg: CacheConfig, n_ctx: int, n_batch: int, n_threads: int, errors: list[str],
                 swa_full: bool = False, rewriter=None):
    """A context with flash attention on, n_ubatch = n_batch, a window-sized cache for sliding-window layers
    unless swa_full (off by default, as llama-perplexity runs), and cfg's uniform types (a profile's are set on the
    model); with a rewriter (qaq_gguf.rewrite) as its eval callback."""
    lc = llama.llama_cpp_module()
    p = lc.llama_context_default_params()
    p.n_ctx = n_ctx
    p.n_batch = n_batch
    p.n_ubatch = n_batch
    p.n_seq_max = 1
    p.n_threads = n_threads
    p.n_threads_batch = n_threads
    p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
    p.swa_full = swa_full
    p.no_perf = True
    if rewriter is not None:
        p.cb_eval = rewriter.callback
        p.cb_eval_user_data = None
    if cfg.profile is None:
        p.type_k = _cache_type(cfg, cfg.type_k)
        p.type_v = _cache_type(cfg, cfg.type_v)
    ctx = lc.llama_init_from_model(model, p)
    if not ctx:
        raise RuntimeError(f"config {cfg.label!r}: llama.cpp could not create the context" + _tail(errors))
    return ctx


def kv_summary(ctx, model) -> dict:
    """What the context allocated: K/V bytes summed over layers, and bits per cached value.

    avg_bits is qaq_gguf.profile.average_bits of the allocated types (one figure per profile everywhere): each
    layer's bits per value (8 * bytes / (n_cells * values per token), block scales included) weighted by the values
    it stores per token. The bytes are the cache tensors' own sizes (kv_layer_info) at this context, where
    sliding-window layers hold fewer cells."""
    rows = runtime.kv_layer_info(ctx)
    ident = profile.loaded_model_identity(llama.as_cffi(model))  # the layers' shapes
    nbytes = bits = values = 0
    for r in rows:
        if not ident.has_kv(r["layer"]) or not r["n_cells"]:
            continue
        nbytes += r["bytes_k"] + r["bytes_v"]
        bits += 8.0 * (r["bytes_k"] + r["bytes_v"]) / r["n_cells"]
        values += ident.n_embd_k(r["layer"]) + ident.n_embd_v(r["layer"])
    return {"type_k": _types_summary(r["type_k"] for r in rows), "type_v": _types_summary(r["type_v"] for r in rows),
            "kv_bytes": int(nbytes), "avg_bits": bits / values if values else 0.0,
            "n_cells": sorted({r["n_cells"] for r in rows})}


def _types_summary(types) -> str:
    """One type name, or "mixed(a,b,...)" for a per-layer map (finest first)."""
    order = {t: i for i, t in enumerate(cachetypes.names())}
    seen = sorted({t for t in types if t != "none"}, key=lambda t: order.get(t, len(order)))
    return seen[0] if len(seen) == 1 else "mixed(" + ",".join(seen) + ")"


def _fill_batch(batch, tokens: Sequence[int], pos0: int, first: int, last: int) -> int:
    """Put tokens at positions pos0.. into batch (sequence 0), logits for positions in [first, last];
    returns the number of outputs."""
    n_out = 0
    for k, tok in enumerate(tokens):
        pos = pos0 + k
        batch.token[k] = tok
        batch.pos[k] = pos
        batch.n_seq_id[k] = 1
        batch.seq_id[k][0] = 0
        out = first <= pos <= last
        batch.logits[k] = out
        n_out += out
    batch.n_tokens = len(tokens)
    return n_out


def _decode(ctx, batch, n_out: int, n_vocab: int, label: str, errors: list[str], rewriter=None,
            pos: np.ndarray | None = None) -> np.ndarray | None:
    """Decode the batch; the logits of its n_out outputs (a view into llama.cpp's buffer, valid until the next
    decode in this context), or None when it has none. A rewriter learns the batch's positions first."""
    lc = llama.llama_cpp_module()
    if rewriter is not None:
        rewriter.before_decode(pos)
    rc = lc.llama_decode(ctx, batch)
    if rewriter is not None:
        rewriter.raise_error()
    if rc != 0:
        raise RuntimeError(f"config {label!r}: llama_decode failed with {rc}" + _tail(errors))
    if n_out == 0:
        return None
    ptr = lc.llama_get_logits(ctx)
    return np.ctypeslib.as_array(ptr, shape=(n_out, n_vocab))


# --- statistics ------------------------------------------------------------------------------------------------

def _log_softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log-probabilities float32, max logit float64, log-sum-exp float64) of rows of logits, the way
    perplexity.cpp's log_softmax sums (exp in float32, sums in float64)."""
    mx = logits.max(axis=1, keepdims=True)
    shifted = logits - mx
    lse = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64))
    return shifted - lse.astype(np.float32)[:, None], mx[:, 0].astype(np.float64), lse


def _nll(logits: np.ndarray, mx: np.ndarray, lse: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each row's target: max + log(sum exp(l - max)) - l[target]."""
    return mx + lse - logits[np.arange(len(targets)), targets].astype(np.float64)


def _compare(ref: dict, logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nll, KLD(ref || cfg), same top-1) per row of a config's logits against the reference rows."""
    n = len(targets)
    nll = np.empty(n)
    kld = np.empty(n)
    for a in range(0, n, _ROW_BLOCK):
        b = min(n, a + _ROW_BLOCK)
        lp, mx, lse = _log_softmax(logits[a:b])
        nll[a:b] = _nll(logits[a:b], mx, lse, targets[a:b])
        diff = ref["logp"][a:b] - lp
        diff *= ref["p"][a:b]
        kld[a:b] = diff.sum(axis=1, dtype=np.float64)
    top1 = np.argmax(logits, axis=1) == ref["top"]
    return nll, kld, top1


def _reference_rows(logits: np.ndarray, targets: np.ndarray) -> dict:
    """Reference log-probabilities, probabilities, top-1 and nll of one batch's scored rows."""
    n = len(targets)
    logp = np.empty(logits.shape, np.float32)
    nll = np.empty(n)
    for a in range(0, n, _ROW_BLOCK):
        b = min(n, a + _ROW_BLOCK)
        logp[a:b], mx, lse = _log_softmax(logits[a:b])
        nll[a:b] = _nll(logits[a:b], mx, lse, targets[a:b])
    return {"logp": logp, "p": np.exp(logp), "top": np.argmax(logits, axis=1), "nll": nll}


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, as perplexity.cpp computes them (0 error for 10 values or fewer)."""
    n = len(values)
    if n < 1:
        return 0.0, 0.0
    f = float(np.sum(values) / n)
    df = float(np.sum(values * values) / n) - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """perplexity.cpp's percentile: linear interpolation between the sorted values."""
    if len(sorted_values) == 0:
        return 0.0
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, len(sorted_values) - 1)])


def _ppl_stats(nll: np.ndarray) -> dict:
    """PPL = exp(mean nll) and perplexity.cpp's "Final estimate" uncertainty (ppl * stderr of the nll)."""
    mean, err = mean_and_uncertainty(nll)
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_err": ppl * err, "nll": mean}


def _config_stats(nll: np.ndarray, ref_nll: np.ndarray, kld: np.ndarray, top1: np.ndarray, ref_ppl: float) -> dict:
    out = _ppl_stats(nll)
    out["dppl_pct"] = 100.0 * (out["ppl"] / ref_ppl - 1.0)
    # uncertainty of the ratio from the paired nll (perplexity.cpp's "Mean PPL(Q)/PPL(base)" line)
    n = len(nll)
    _, e1 = mean_and_uncertainty(nll)
    _, e2 = mean_and_uncertainty(ref_nll)
    cov = (float(np.sum(nll * ref_nll)) / n - float(np.mean(nll)) * float(np.mean(ref_nll))) / (n - 1) \
        if n >= 10 else 0.0
    ratio_unc = math.sqrt(max(0.0, e1 * e1 + e2 * e2 - 2.0 * cov))
    out["dppl_pct_err"] = 100.0 * (out["ppl"] / ref_ppl) * ratio_unc
    out["kld"], out["kld_err"] = mean_and_uncertainty(kld)
    srt = np.sort(kld.astype(np.float32))  # float32 like perplexity.cpp's kld_values
    out["kld_p99"] = percentile(srt, 0.99)
    out["kld_max"] = float(srt[-1]) if len(srt) else 0.0
    out["top1"] = 100.0 * float(np.mean(top1)) if len(top1) else 0.0
    return out


def _by_position(nll: np.ndarray, ref_nll: np.ndarray, kld: np.ndarray, top1: np.ndarray, n_chunk: int,
                 first: int, last: int, edges: Sequence[int]) -> list[dict]:
    """KLD, top-1 and ΔPPL of the scored rows in each position range (rows: chunk-major, positions first..last)."""
    pos = np.tile(np.arange(first, last + 1), n_chunk)
    out = []
    for a, b in zip([first] + list(edges), list(edges) + [last + 1]):
        m = (pos >= a) & (pos < b)
        k, ke = mean_and_uncertainty(kld[m])
        out.append({"from": int(a), "to": int(b), "n": int(m.sum()), "kld": k, "kld_err": ke,
                    "top1": 100.0 * float(np.mean(top1[m])),
                    "dppl_pct": 100.0 * (math.exp(float(np.mean(nll[m])) - float(np.mean(ref_nll[m]))) - 1.0)})
    return out


# --- the evaluation --------------------------------------------------------------------------------------------

def evaluate(model_path: str | Path, text: str, configs: Sequence[CacheConfig], *, n_ctx: int = 1024,
             n_batch: int = 256, n_chunks: int | None = None, n_threads: int | None = None, progress: bool = True,
             verbose: bool = False, text_name: str | None = None, swa_full: bool = False,
             score_from: int | None = None, position_edges: Sequence[int] = ()) -> dict:
    """Perplexity, KL-divergence and top-1 agreement of each KV cache config against the f16/f16 cache.

    n_chunk = min(n_chunks, n_tokens // n_ctx) chunks of n_ctx tokens are scored (all when n_chunks is None);
    n_batch (at most n_ctx) is both the logical and the physical batch. n_threads defaults to the CPU count.
    score_from is the first scored position (default n_ctx/2, as llama-perplexity; long chunks are better scored
    from early on); position_edges (positions, ascending) split the scored rows into ranges [score_from, e1),
    [e1, e2), ... reported as "by_position" (KLD, top-1 and ΔPPL per range: does the error grow with depth?).
    verbose keeps llama.cpp's log; text_name only labels the table. A config with a ``method`` runs over an f16
    cache whose Q/K/V the method rewrites (qaq_gguf.rewrite); such a run keeps every layer's full context in every
    context, the reference included (swa_full: the same attention, more memory), as it does with swa_full=True.
    Returns a JSON-serialisable dict:
    {"settings": {...}, "reference": {...}, "results": [{label, type_k, type_v, profile, ppl, ppl_err, dppl_pct,
    dppl_pct_err, kld, kld_err, kld_p99, kld_max, top1, kv_bytes, avg_bits, ...}, ...]} (kld in nats, top1 and
    dppl_pct in percent, kv_bytes as llama.cpp allocated them for this n_ctx).

    Raises ValueError for an unknown cache type or a text shorter than one chunk, ProfileError for a profile that
    does not fit the model, RuntimeError when llama.cpp fails to load, create a context or decode.
    """
    configs = list(configs)
    n_batch, first, edges = _check_arguments(configs, n_ctx, n_batch, n_chunks, score_from, position_edges)
    res = _score(model_path, configs, lambda base: _tokenize_chunks(base, text, n_ctx, n_chunks), n_ctx=n_ctx,
                 n_batch=n_batch, first=first, edges=edges, n_threads=n_threads, progress=progress, verbose=verbose,
                 swa_full=swa_full)
    res["settings"] = {"model": str(model_path), "text": text_name,
                       "text_sha256": hashlib.sha256(text.encode()).hexdigest(), **res["settings"]}
    return res


def evaluate_chat(model_path: str | Path, configs: Sequence[CacheConfig], *, prompts: Sequence[str] | None = None,
                  max_tokens: int = 128, n_batch: int = 256, n_threads: int | None = None, progress: bool = True,
                  verbose: bool = False) -> dict:
    """evaluate()'s statistics on chats: each prompt (default the packaged evaluation prompts, never used for
    calibration) answered greedily by the model on the f16 cache in its own chat template, then every config
    scored teacher-forced along that answer (the answer's tokens only), KLD against the f16 cache. Each
    conversation starts from an empty cache. ValueError for a model without a chat template."""
    from . import chat

    configs = list(configs)
    _check_configs(configs)
    if n_batch < 1:
        raise ValueError(f"n_batch must be positive, got {n_batch}")
    convs = chat.conversations(model_path, prompts or chat.prompts("evaluation"), max_tokens=max_tokens,
                               n_threads=n_threads, progress=progress)
    if not convs:
        raise ValueError(f"{model_path} has no chat template: no chats to score")
    n_ctx = max(len(c.tokens) for c in convs)
    res = _score(model_path, configs, lambda base: _conversation_chunks(base, convs), n_ctx=n_ctx,
                 n_batch=min(n_batch, n_ctx), first=0, edges=[], n_threads=n_threads, progress=progress,
                 verbose=verbose, swa_full=False)
    text = chat.chat_text(convs)
    res["settings"] = {"model": str(model_path), "text": f"chat ({len(convs)} conversations)",
                       "text_sha256": hashlib.sha256(text.encode()).hexdigest(), **res["settings"],
                       "chat_max_tokens": max_tokens}
    return res


def _score(model_path, configs: list[CacheConfig], tokens, *, n_ctx: int, n_batch: int, first: int,
           edges: list[int], n_threads: int | None, progress: bool, verbose: bool, swa_full: bool) -> dict:
    """The reference and each config in lockstep over the chunks ``tokens(model)`` gives; their statistics."""
    n_threads = n_threads or os.cpu_count() or 1
    swa_full = swa_full or any(c.method is not None for c in configs)
    ref_cfg = CacheConfig("reference (f16)", None, REFERENCE_TYPE, REFERENCE_TYPE)
    held = _Held()
    t0 = time.time()
    with llama.quiet_llama_log(verbose) as errors:
        try:
            base = held.model(_load_model(model_path, errors=errors))
            tok = tokens(base)
            reference = _Run(ref_cfg, held.context(_new_context(base, ref_cfg, n_ctx, n_batch, n_threads, errors,
                                                                swa_full)), base)
            runs = [_config_run(model_path, base, c, tok, held, n_ctx, n_batch, n_threads, errors, swa_full)
                    for c in configs]
            held.batch = llama.llama_cpp_module().llama_batch_init(n_batch, 0, 1)
            scores = _Lockstep(reference, runs, held.batch, tok, n_ctx, n_batch, first, errors)
            scores.run(progress)
            ref_result, results = scores.statistics(edges)
        finally:
            held.free()
    settings = {
        "n_tokens": tok.n_tokens(), "n_ctx": n_ctx, "n_batch": n_batch, "n_ubatch": n_batch,
        "n_chunks": tok.n_chunk, "first": first, "position_edges": edges, "n_tokens_scored": int(len(scores.ref_nll)),
        "add_bos": tok.add_bos, "n_vocab": tok.n_vocab,
        "flash_attn": True, "reference": f"{REFERENCE_TYPE}/{REFERENCE_TYPE}", "n_threads": n_threads,
        "swa_full": swa_full,
        "seconds": round(time.time() - t0, 2),
    }
    return {"settings": settings, "reference": ref_result, "results": results}


def _check_arguments(configs: list[CacheConfig], n_ctx: int, n_batch: int, n_chunks: int | None,
                     score_from: int | None, position_edges: Sequence[int]) -> tuple[int, int, list[int]]:
    """evaluate()'s arguments checked before anything is loaded (every type name included); returns the batch
    size (at most n_ctx), the first scored position and the position edges."""
    if n_ctx < 8:
        raise ValueError(f"n_ctx must be at least 8, got {n_ctx}")
    if n_batch < 1:
        raise ValueError(f"n_batch must be positive, got {n_batch}")
    n_batch = min(n_batch, n_ctx)
    if n_chunks is not None and n_chunks < 1:
        raise ValueError(f"n_chunks must be positive, got {n_chunks}")
    _check_configs(configs)
    if score_from is not None and not 0 <= score_from <= n_ctx - 2:
        raise ValueError(f"score_from must be in [0, n_ctx-2] = [0, {n_ctx - 2}], got {score_from}")
    first = n_ctx // 2 if score_from is None else score_from
    edges = [int(e) for e in position_edges]
    if edges and (edges != sorted(set(edges)) or edges[0] <= first or edges[-1] > n_ctx - 2):
        raise ValueError(f"position edges must ascend within ({first}, {n_ctx - 2}], got {edges}")
    return n_batch, first, edges


def _check_configs(configs: list[CacheConfig]) -> None:
    """Distinct labels, every type name known, methods only over the f16 cache: checked before anything loads."""
    labels = [c.label for c in configs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"config labels must be distinct: {labels}")
    for c in configs:  # every type name is checked before anything is loaded
        if c.method is not None and (c.profile is not None or (c.type_k, c.type_v) != ("f16", "f16")):
            raise ValueError(f"config {c.label!r}: a method rewrites over an f16 cache; give no profile or types")
        if c.profile is None:
            _cache_type(c, c.type_k)
            _cache_type(c, c.type_v)


class _Held:
    """What one evaluation holds in llama.cpp, freed together at its end: the batch, the contexts, the models."""

    def __init__(self):
        self.models: list = []
        self.contexts: list = []
        self.batch = None

    def model(self, m):
        self.models.append(m)
        return m

    def context(self, ctx):
        self.contexts.append(ctx)
        return ctx

    def free(self) -> None:
        lc = llama.llama_cpp_module()
        if self.batch is not None:
            lc.llama_batch_free(self.batch)
        for ctx in self.contexts:
            lc.llama_free(ctx)
        for m in self.models:
            lc.llama_model_free(m)


@dataclass
class _Tokens:
    """The text as evaluate() scores it: its tokens, how many chunks, and the vocabulary facts chunks need."""
    tokens: np.ndarray
    n_chunk: int
    n_vocab: int
    add_bos: bool
    bos: int
    # chats instead of one text: each conversation's tokens and the first position scored (its answer's start - 1)
    seqs: list[tuple[np.ndarray, int]] | None = None

    def chunk(self, i: int, n_ctx: int) -> np.ndarray:
        """Chunk i, its first token replaced by BOS when the vocabulary adds one (as llama-perplexity); a chat
        as it was tokenized."""
        if self.seqs is not None:
            return self.seqs[i][0]
        chunk = self.tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if self.add_bos:
            chunk[0] = self.bos
        return chunk

    def scored(self, i: int, n_ctx: int, first: int) -> tuple[int, int]:
        """(first, last) positions of chunk i whose next token is scored."""
        if self.seqs is not None:
            return self.seqs[i][1], len(self.seqs[i][0]) - 2
        return first, n_ctx - 2

    def n_tokens(self) -> int:
        return int(sum(len(t) for t, _ in self.seqs)) if self.seqs is not None else int(len(self.tokens))


def _conversation_chunks(model, convs) -> _Tokens:
    """Step 1 for chats: each conversation one chunk, scored along its answer."""
    lc = llama.llama_cpp_module()
    vocab = lc.llama_model_get_vocab(model)
    seqs = [(np.asarray(c.tokens, dtype=np.int64), c.answer_from - 1) for c in convs]
    return _Tokens(np.concatenate([t for t, _ in seqs]), len(seqs), int(lc.llama_vocab_n_tokens(vocab)),
                   bool(lc.llama_vocab_get_add_bos(vocab)), int(lc.llama_vocab_bos(vocab)), seqs)


def _tokenize_chunks(model, text: str, n_ctx: int, n_chunks: int | None) -> _Tokens:
    """Step 1: the text's tokens and the number of chunks scored (ValueError when not one chunk fits)."""
    lc = llama.llama_cpp_module()
    vocab = lc.llama_model_get_vocab(model)
    n_vocab = int(lc.llama_vocab_n_tokens(vocab))
    add_bos = bool(lc.llama_vocab_get_add_bos(vocab))
    bos = int(lc.llama_vocab_bos(vocab))
    tokens = np.asarray(tokenize(model, text), dtype=np.int64)
    n_chunk_max = len(tokens) // n_ctx
    if n_chunk_max < 1:
        raise ValueError(f"the text tokenizes to {len(tokens)} tokens, but one chunk of n_ctx={n_ctx} needs "
                         f"at least {n_ctx} tokens")
    n_chunk = n_chunk_max if n_chunks is None else min(n_chunks, n_chunk_max)
    return _Tokens(tokens, n_chunk, n_vocab, add_bos, bos)


@dataclass
class _Run:
    """One cache in the evaluation (the reference, or a config): its context, its model, its rewriter if any."""
    cfg: CacheConfig
    ctx: object
    model: object
    rewriter: rewrite.Rewriter | None = None


def _config_run(model_path, base, cfg: CacheConfig, tok: _Tokens, held: _Held, n_ctx: int, n_batch: int,
                n_threads: int, errors: list[str], swa_full: bool) -> _Run:
    """A config's context: on the shared model, or on its own copy when a profile sets per-layer types (they live
    on the model); a method's rewriter probed with the first token."""
    model = base
    if cfg.profile is not None:
        model = held.model(_load_model(model_path, errors=errors))  # per-layer types live on the model
        runtime.apply_profile(model, model_path, cfg.profile)
    rw = rewrite.Rewriter(cfg.method) if cfg.method is not None else None
    ctx = held.context(_new_context(model, cfg, n_ctx, n_batch, n_threads, errors, swa_full, rw))
    if rw is not None:
        rw.probe(ctx, tok.bos if tok.add_bos else int(tok.tokens[0]))
    return _Run(cfg, ctx, model, rw)


class _Lockstep:
    """The reference and every config decoded batch after batch on the same chunks (steps 2 and 3: the reference
    pass, then one pass per config), and the statistics of the scored rows (step 4, with step 5's by-position
    tables). Rows are chunk-major, positions first..n_ctx-2 of each chunk (the last has no next token)."""

    def __init__(self, reference: _Run, runs: list[_Run], batch, tok: _Tokens, n_ctx: int, n_batch: int,
                 first: int, errors: list[str]):
        self.reference, self.runs, self.batch, self.tok, self.errors = reference, runs, batch, tok, errors
        self.n_ctx, self.n_batch, self.first, self.last = n_ctx, n_batch, first, n_ctx - 2
        n_rows = sum(b - a + 1 for a, b in (tok.scored(i, n_ctx, first) for i in range(tok.n_chunk)))
        self.ref_nll = np.empty(n_rows)
        self.nll = np.empty((len(runs), n_rows))
        self.kld = np.empty_like(self.nll)
        self.top1 = np.zeros(self.nll.shape, dtype=bool)
        self.row = 0

    def run(self, progress: bool) -> None:
        bar = progress_bar(progress, self.tok.n_chunk, "chunks")
        for i in range(self.tok.n_chunk):
            self._chunk(i)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        assert self.row == len(self.ref_nll)

    def _chunk(self, i: int) -> None:
        """Chunk i from an empty cache in every context, batch after batch."""
        lc = llama.llama_cpp_module()
        chunk = self.tok.chunk(i, self.n_ctx)
        first, last = self.tok.scored(i, self.n_ctx, self.first)
        for r in [self.reference, *self.runs]:
            lc.llama_memory_clear(lc.llama_get_memory(r.ctx), True)
        for r in self.runs:
            if r.rewriter is not None:
                r.rewriter.begin(self.n_ctx)
        for pos0 in range(0, len(chunk), self.n_batch):
            part = chunk[pos0:pos0 + self.n_batch]
            n_out = _fill_batch(self.batch, part.tolist(), pos0, first, last)
            pos = np.arange(pos0, pos0 + len(part))
            ref, targets = self._reference_pass(chunk, max(first, pos0), n_out)
            self._config_passes(ref, targets, n_out, pos)
            self.row += n_out

    def _reference_pass(self, chunk: np.ndarray, p_first: int, n_out: int) -> tuple[dict | None, np.ndarray | None]:
        """The batch in the reference context: its scored rows (log-probabilities, top-1, nll) and their targets,
        (None, None) for a batch without scored rows."""
        r = self.reference
        logits = _decode(r.ctx, self.batch, n_out, self.tok.n_vocab, r.cfg.label, self.errors)
        if logits is None:
            return None, None
        targets = chunk[p_first + 1:p_first + 1 + n_out]  # never position 0 (the BOS it may have replaced)
        ref = _reference_rows(logits, targets)
        self.ref_nll[self.row:self.row + n_out] = ref["nll"]
        return ref, targets

    def _config_passes(self, ref: dict | None, targets: np.ndarray | None, n_out: int, pos: np.ndarray) -> None:
        """The batch in each config's context, its scored rows compared with the reference's."""
        rows = slice(self.row, self.row + n_out)
        for k, r in enumerate(self.runs):
            logits = _decode(r.ctx, self.batch, n_out, self.tok.n_vocab, r.cfg.label, self.errors, r.rewriter, pos)
            if ref is not None:  # else no scored rows: the batch only fills the cache
                self.nll[k, rows], self.kld[k, rows], self.top1[k, rows] = _compare(ref, logits, targets)

    def statistics(self, edges: Sequence[int]) -> tuple[dict, list[dict]]:
        """The reference's PPL and each config's statistics against it, with the cache each allocated; a
        by-position table per config when edges are given."""
        ref = self.reference
        reference = {"label": ref.cfg.label, "profile": None, **_ppl_stats(self.ref_nll),
                     **kv_summary(ref.ctx, ref.model)}
        results = []
        for k, r in enumerate(self.runs):
            c = r.cfg
            out = {"label": c.label, "profile": str(c.profile) if c.profile is not None else None}
            out.update(_config_stats(self.nll[k], self.ref_nll, self.kld[k], self.top1[k], reference["ppl"]))
            out.update(kv_summary(r.ctx, r.model))
            if edges:
                out["by_position"] = _by_position(self.nll[k], self.ref_nll, self.kld[k], self.top1[k],
                                                  self.tok.n_chunk, self.first, self.last, edges)
            results.append(out)
        return reference, results


# --- the table -------------------------------------------------------------------------------------------------

def format_table(result: dict) -> str:
    """A fixed-width table of evaluate()'s result, the settings on its first line."""
    s = result["settings"]
    name = s.get("text") or f"text {s['text_sha256'][:12]}"
    lines = [f"{name} chunks={s['n_chunks']} n_ctx={s['n_ctx']} batch={s['n_batch']} "
             f"scored={s['n_tokens_scored']} tokens, flash attention {'on' if s['flash_attn'] else 'off'}, "
             f"reference {s['reference']}"]
    hdr = (f"{'config':<20} {'K':>10} {'V':>10} {'bits':>6} {'KV MiB':>8} {'PPL':>18} {'ΔPPL %':>8} "
           f"{'KLD':>20} {'KLD p99':>9} {'top-1 %':>8}")
    lines += [hdr, "-" * len(hdr)]
    ref = result["reference"]
    lines.append(_row(ref, f"{ref['ppl']:.4f} ± {ref['ppl_err']:.4f}", "", "", "", ""))
    for r in result["results"]:
        lines.append(_row(r, f"{r['ppl']:.4f} ± {r['ppl_err']:.4f}", f"{r['dppl_pct']:+.3f}",
                          f"{r['kld']:.6f} ± {r['kld_err']:.6f}", f"{r['kld_p99']:.5f}", f"{r['top1']:.2f}"))
    if s.get("position_edges"):
        ranges = result["results"][0]["by_position"] if result["results"] else []
        hdr = f"{'KLD by position':<20} " + " ".join(f"{str(b['from']) + '-' + str(b['to'] - 1):>13}" for b in ranges)
        lines += ["", hdr, "-" * len(hdr)]
        for r in result["results"]:
            label = r["label"] if len(r["label"]) <= 20 else r["label"][:19] + "…"
            lines.append(f"{label:<20} " + " ".join(f"{b['kld']:>13.5f}" for b in r["by_position"]))
    return "\n".join(lines)


def _row(r: dict, ppl: str, dppl: str, kld: str, p99: str, top1: str) -> str:
    label = r["label"] if len(r["label"]) <= 20 else r["label"][:19] + "…"
    return (f"{label:<20} {_short(r['type_k']):>10} {_short(r['type_v']):>10} {r['avg_bits']:>6.3f} "
            f"{r['kv_bytes'] / 2**20:>8.2f} {ppl:>18} {dppl:>8} {kld:>20} {p99:>9} {top1:>8}")


def _short(t: str) -> str:
    return "mixed" if t.startswith("mixed(") else t
