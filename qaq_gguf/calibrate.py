"""Calibration: from a model and text to per-layer K/V sensitivity scores, and from scores to a profile.

    scores = calibrate(model, text)                       # runs the model (collect.py), scores (scoring.py)
    prof = allocate(scores, avg_bits=5.5)                 # multiple-choice knapsack (solver.py)
    write_profile(prof, "qaq.gguf")

``calibrate`` streams: each chunk's activations are scored under every candidate type and dropped, so memory
stays at one chunk whatever the text length. The score of layer ``l``'s K in type ``t`` is the relative
attention-output error QAQ's model predicts (``scoring.py``), averaged over chunks; the solver minimises the sum
of the chosen scores under the size budget, each weighted by its layer's measured gain (ablate.gains: what a unit
of that layer's score costs end to end) where the scores carry gains, else keys' counted KEY_WEIGHT times.
"""
from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import _native, cachetypes, chat, collect, llama, profile, rope, scoring, solver, transforms
from .progress import progress_bar


@dataclass
class Scores:
    """Per-layer scores of one model: ``k[l, c]`` / ``v[l, c]`` for candidate ``candidates[c]``, and the
    statistics the profile's K/V transforms are made from (transforms.py), flat, layer after layer."""

    ident: profile.ModelIdentity
    candidates: list[str]
    k: np.ndarray
    v: np.ndarray
    settings: dict = field(default_factory=dict)
    k_mean: np.ndarray | None = None   # mean key (first token left out) when keys are stored centred
    k_scale: np.ndarray | None = None  # rebalancing scales when keys are rebalanced
    v_mean: np.ndarray | None = None   # mean value (first token left out) when values are stored centred
    k_first: np.ndarray | None = None  # the first token's key and value (position 0, BOS) when it is kept exact
    v_first: np.ndarray | None = None
    exact_cells: int = 0               # the first KV cells kept exact in f16 (attention sinks, any token); 0: none
    gain_k: np.ndarray | None = None   # per layer: measured end-to-end cost per unit of score (ablate.gains)
    gain_v: np.ndarray | None = None

    def layers(self) -> list[int]:
        return [il for il in range(self.ident.n_layer) if self.ident.has_kv(il)]


# cache types a GPU backend has no kernels for (flash attention, the cache write): left out of the default candidates
# of a build that has that backend, since a profile using them would be refused there: iq4_nl has no CUDA
# flash-attention kernel. (The trellis types have CPU, CUDA, Vulkan and Metal kernels: patches/0032, 0033, 0035, 0036.)
NO_GPU_KERNELS = {"CUDA": ("iq4_nl",)}


# the score of a (layer, type) the type cannot hold: finite, so that a profile stores it, and never chosen
UNFIT = 1e30

# exact cells chosen from the attention mass: the leading positions that each draw at least SINK_MASS of the attention
# of the queries at least SINK_DISTANCE positions after them (averaged over layers, heads, queries and chunks;
# a position of a 512-token chunk drawing its uniform share gets ~0.003), at most SINK_MAX
SINK_MASS = 0.02
SINK_DISTANCE = 128
SINK_MAX = 16

# Without measured gains (ablate.gains) the solver counts a key's predicted error this many times a value's: a layer's
# score is its own attention-output error, and measured end to end (KLD against f16 over 8x1024 tokens) a key error
# costs more than the same score in V. Weighted 2x, the 3.0-bit profiles of both models moved bits from V to K and
# measured 0.87x (Gemma 3) and 0.96x (SmolLM2) the KLD, 0.93x / 0.97x at 4.0 bits; on the bash manual 0.99x / 1.07x
# (docs/benchmarks.md, "Keys weighted twice in the solver").
KEY_WEIGHT = 2.0

# Chunk c is scored as if it started at position frac(c * POSITION_STEP) * (positions - n_ctx) (chunk 0 at 0): the
# golden-ratio sequence spreads any number of chunks evenly over the positions a profile serves.
POSITION_STEP = 0.6180339887498949


def sink_mass(act: collect.LayerActivations, n: int = SINK_MAX, distance: int = SINK_DISTANCE) -> np.ndarray | None:
    """The mean attention each of the first ``n`` positions draws from the queries ``distance`` or more positions
    after it (None when the chunk is too short)."""
    a = act.attn
    if a.shape[1] <= distance + n:
        return None
    return a[:, distance + n:, :n].mean(axis=(0, 1))


def choose_exact_cells(mass: np.ndarray | None) -> int:
    """The exact cells a profile keeps: 1 + the last leading position drawing at least SINK_MASS (0: none)."""
    if mass is None:
        return 0
    hot = np.nonzero(np.asarray(mass) >= SINK_MASS)[0]
    return int(hot[-1]) + 1 if len(hot) else 0


def default_candidates() -> list[str]:
    """The cache types calibration chooses from: f16 and every quantized type this build's cache accepts; with a
    GPU backend, only those it has kernels for (a profile using another is refused there)."""
    cands = list(cachetypes.DEFAULT_CANDIDATES)
    for backend in _native.backend_names():
        left = [c for c in cands if c in NO_GPU_KERNELS.get(backend, ())]
        if left:
            print(f"qaq-gguf: candidates left out: {', '.join(left)} (no {backend} kernels)", file=sys.stderr)
        cands = [c for c in cands if c not in left]
    return cands


def _fits_per_layer(ident: profile.ModelIdentity, cands: Sequence[str]) -> dict[int, list[str]]:
    """For each layer with a cache, the candidates that can hold both its K and V rows (whole blocks)."""
    return {il: [c for c in cands
                 if cachetypes.fits(c, ident.head_dim_k[il]) and cachetypes.fits(c, ident.head_dim_v[il])]
            for il in range(ident.n_layer) if ident.has_kv(il)}


def fitting_candidates(ident: profile.ModelIdentity, cands: Sequence[str], *,
                       quiet: bool = False) -> tuple[list[str], dict[int, list[str]]]:
    """(kept, per_layer): the candidates that can hold some layer's K and V rows (whole blocks of the head size),
    and for each layer with a cache those that can hold both of its rows. A type no layer can hold is left out,
    with one line saying which and why; a layer no quantized candidate fits is refused by name (ValueError)."""
    per_layer = _fits_per_layer(ident, cands)
    layers = list(per_layer)  # the layers with a cache, in order
    kept = [c for c in cands if any(c in per_layer[il] for il in layers)]
    left = [c for c in cands if c not in kept]
    if left and not quiet:
        heads = sorted({ident.head_dim_k[il] for il in layers} | {ident.head_dim_v[il] for il in layers})
        why = ", ".join(f"{c} (blocks of {cachetypes.get(c).block_size})" for c in left)
        print(f"qaq-gguf: candidates left out: {why}: no whole block in a head of "
              f"{'/'.join(map(str, heads))} values", file=sys.stderr)
    for il in layers:
        if not any(cachetypes.get(c).is_quantized for c in per_layer[il]):
            blocks = sorted({cachetypes.get(c).block_size for c in cands if cachetypes.get(c).is_quantized})
            raise ValueError(
                f"{ident.name or ident.architecture}: no quantized cache type fits layer {il} (head size K "
                f"{ident.head_dim_k[il]}, V {ident.head_dim_v[il]}; the candidates' blocks are "
                f"{', '.join(map(str, blocks))} values): llama.cpp can only store this model's cache as f16/bf16/f32")
    return kept, per_layer


@dataclass
class _Moments:
    """Running sums of one layer over the chunks seen (first token left out of the K/V statistics)."""

    n: int = 0
    k_sum: np.ndarray | None = None
    k_sq: np.ndarray | None = None
    v_sum: np.ndarray | None = None
    q_sq: np.ndarray | None = None
    n_q: int = 0
    k_first: np.ndarray | None = None
    v_first: np.ndarray | None = None
    first_varies: bool = False

    def add(self, act: collect.LayerActivations, skip_first: bool, track_first: bool = True,
            k_first: np.ndarray | None = None) -> None:
        """One chunk's activations; ``skip_first`` leaves its first token out of the statistics, ``track_first``
        also compares it with the first chunk's (a chunk whose first token is not the usual one passes False);
        ``k_first``: the first token's key at position 0 when ``act`` holds the chunk moved to other positions."""
        k, v, q = (a.astype(np.float64) for a in (act.k, act.v, act.q))
        k0 = act.k[0] if k_first is None else k_first
        if skip_first and not track_first:
            k, v = k[1:], v[1:]
        elif skip_first:
            if self.k_first is None:
                self.k_first, self.v_first = k0.copy(), act.v[0].copy()
            elif not (np.allclose(k0, self.k_first, rtol=1e-3, atol=1e-4)
                      and np.allclose(act.v[0], self.v_first, rtol=1e-3, atol=1e-4)):
                self.first_varies = True
            k, v = k[1:], v[1:]
        acc = lambda a, b: b if a is None else a + b  # noqa: E731
        self.k_sum, self.k_sq, self.v_sum = acc(self.k_sum, k.sum(0)), acc(self.k_sq, (k * k).sum(0)), \
            acc(self.v_sum, v.sum(0))
        n_head, hkv = q.shape[1], k.shape[1]
        q2 = (q * q).sum(0).reshape(hkv, n_head // hkv, -1).sum(1)  # summed over each KV head's query heads
        self.q_sq = acc(self.q_sq, q2)
        self.n += k.shape[0]
        self.n_q += q.shape[0] * (n_head // hkv)

    def k_mean(self) -> np.ndarray:
        return (self.k_sum / self.n).astype(np.float32)

    def k_var(self) -> np.ndarray:
        return np.maximum(self.k_sq / self.n - (self.k_sum / self.n) ** 2, 0.0)

    def v_mean(self) -> np.ndarray:
        return (self.v_sum / self.n).astype(np.float32)

    def scales(self, partner: np.ndarray) -> np.ndarray:
        return transforms.rebalance_scales(self.q_sq / self.n_q, self.k_var(), partner)


def calibrate(model_path: str | Path, text: str, *, n_ctx: int = 512, n_chunks: int | None = 8,
              chat_chunks: int | None = None, candidates: Sequence[str] | None = None, method: str = "measured",
              max_queries: int | None = 128, window: int = 5, n_threads: int | None = None, progress: bool = True,
              seed: int = 0, center_keys: bool = True, rebalance_keys: bool = True, center_values: bool = True,
              exact_first: bool = True, exact_cells: int | None = None, positions: int | None = None) -> Scores:
    """Score every layer's K and V under every candidate type on ``text`` (see the module docstring).

    ``chat_chunks``: chunks of chat in the model's own template (chat.py: the packaged calibration prompts answered
    by the model on the f16 cache), scored beside the text's ``n_chunks``; default a quarter of ``n_chunks`` (at
    least one) when the model has a chat template, 0 for plain text only.

    ``method``: ``"measured"`` pushes the real quantization error of each type through the layer's real
    attention (first order in the key error); ``"qaq"`` uses QAQ's closed-form bounds (query-norm percentile for
    keys, attention with the persistence window for values). ``max_queries`` samples query rows per chunk.

    The profile's K/V transforms (transforms.py, each exact for attention): ``center_keys`` stores keys minus
    each layer's mean key, ``rebalance_keys`` scales each RoPE pair of the keys against the queries,
    ``center_values`` stores values minus their mean, ``exact_first`` puts the first token's K and V on the cache
    types' grids so that it is stored exactly: BOS where the model adds one, else the chat template's first token
    (what position 0 holds in every chat). Key scales and value means are kept layer by layer where they lower
    the layer's scores (every chunk is scored with and without them; a layer without keeps scales 1 or mean 0, and
    the settings count the layers that keep them). Statistics are running sums over the chunks seen so far (the first
    chunk's own for chunk 0), so every chunk is scored with transforms it did not fully determine; the final
    statistics are what the profile stores. The first token is left out of them.

    ``exact_cells``: the first cells of every layer's cache kept exact in f16 (attention sinks, whatever tokens they
    hold; llama.cpp's CPU backend): N, 0 for none, or None (default) to choose them from the attention the first
    positions draw (choose_exact_cells), except that a model whose BOS is kept exact (``exact_first``) needs no exact
    cell for position 0 alone: it gets none unless later positions are sinks too. They are scored as exact.

    ``positions``: the longest context the profile serves (default: the model's training context). A key's RoPE
    turns it with its position, so a mean key and key scales measured on the first ``n_ctx`` positions alone fit
    only there: at 8k tokens SmolLM2's 3.0-bit profile calibrated that way measured KLD 0.31 against 0.19 for the
    same types with no transforms. Each chunk's queries and keys are turned as if the chunk started at an offset
    spread over ``[0, positions - n_ctx]`` (:data:`POSITION_STEP`; attention is unchanged, it reads relative
    positions): the statistics and scores are those of keys anywhere in that context. The first token's key stays
    at position 0, where a sequence's first token always is."""
    cands = list(candidates) if candidates else default_candidates()
    for c in cands:
        cachetypes.get(c)  # unknown names fail here, before the model runs
    if positions is not None and positions < 1:
        raise ValueError(f"positions is {positions}: give the longest context the profile serves, in tokens")
    if (center_keys or center_values) and (why := profile.centring_blocked(model_path)):
        print(f"qaq-gguf: keys and values stored as they are: {why}", file=sys.stderr)
        center_keys = center_values = False
    ident = profile.model_identity(model_path)
    cands, fit = fitting_candidates(ident, cands)
    if chat_chunks is None:
        chat_chunks = max(1, (n_chunks or 8) // 4)
    docs = chat.calibration_documents(model_path, chat_chunks, n_ctx, n_threads=n_threads, progress=progress) \
        if chat_chunks else []
    bos = _adds_bos(model_path)
    if exact_first and not bos and not docs:
        print("qaq-gguf: the model adds no BOS and has no chat template: the first token is not kept exact",
              file=sys.stderr)
        exact_first = False
    if exact_cells is not None and not 0 <= exact_cells <= profile.EXACT_CELLS_MAX:
        raise ValueError(f"exact_cells is {exact_cells}, outside [0, {profile.EXACT_CELLS_MAX}]")
    positions, ropes = _positions(model_path, ident, positions, n_ctx)
    run = _Run(ident, cands, fit, method=method, max_queries=max_queries, window=window, seed=seed,
               center_keys=center_keys, rebalance_keys=rebalance_keys, center_values=center_values,
               exact_first=exact_first, exact_cells=exact_cells, bos=bos, workers=n_threads or os.cpu_count() or 1,
               ropes=ropes, span=max(positions - n_ctx, 0))
    bar = progress_bar(progress, (n_chunks or 0) + len(docs) or None, "calibrating")
    try:
        for src, tracked in ((docs, True), (text, bos)):  # chats first: their first token is the one kept exact
            if src:
                for chunk in collect.iter_chunks(model_path, src, n_ctx=n_ctx, n_chunks=None if src is docs
                                                 else n_chunks, layers=run.layers, n_threads=n_threads):
                    run.add(chunk, track_first=tracked)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return run.scores(settings={"text_sha256": hashlib.sha256(text.encode()).hexdigest(), "n_ctx": n_ctx,
                                "chat_chunks": len(docs), "n_tokens": run.n_done * n_ctx, "method": method,
                                "max_queries": max_queries or 0, "window": window, "candidates": cands,
                                "exact_first_token": "bos" if bos else "chat", "positions": positions})


def _positions(model_path: str | Path, ident: profile.ModelIdentity, positions: int | None,
               n_ctx: int) -> tuple[int, dict[int, rope.RopeParams]]:
    """(the positions calibration spreads its chunks over, each layer's RoPE to turn them there): ``positions`` or
    the model's training context; ``n_ctx`` (no turning) for a model without RoPE or with one rope.py does not
    port (said on stderr)."""
    if ident.rope_neox is None:
        return n_ctx, {}
    if positions is None:
        meta, _ = _native.gguf_header(model_path)
        positions = int(meta.get(f"{meta.get('general.architecture', '')}.context_length", 0) or n_ctx)
    if positions <= n_ctx:
        return positions, {}
    try:
        ropes = rope.rope_params(model_path, ident, [il for il in range(ident.n_layer) if ident.has_kv(il)])
    except rope.RopeError as e:
        print(f"qaq-gguf: key statistics measured on positions below {n_ctx} only ({e}): the key mean and scales "
              "may not hold further into a context", file=sys.stderr)
        return n_ctx, {}
    return positions, ropes

def _adds_bos(model_path: str | Path) -> bool:
    """Whether llama.cpp starts the model's prompts with a BOS token."""
    lc = llama.llama_cpp_module()
    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mp.vocab_only = True
    with llama.quiet_llama_log():
        model = lc.llama_model_load_from_file(str(model_path).encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path}")
    try:
        return bool(lc.llama_vocab_get_add_bos(lc.llama_model_get_vocab(model)))
    finally:
        lc.llama_model_free(model)


class _Run:
    """The scores and statistics of one calibration, chunk by chunk."""

    def __init__(self, ident: profile.ModelIdentity, cands: list[str], fit: dict[int, list[str]], *, method: str,
                 max_queries: int | None, window: int, seed: int, center_keys: bool, rebalance_keys: bool,
                 center_values: bool, exact_first: bool, exact_cells: int | None = 0, bos: bool = False,
                 workers: int = 1, ropes: dict[int, rope.RopeParams] | None = None, span: int = 0):
        self.ident, self.cands, self.fit = ident, cands, fit
        self.opts = dict(method=method, max_queries=max_queries, window=window)
        self.seed = seed
        self.center_keys, self.rebalance_keys, self.center_values = center_keys, rebalance_keys, center_values
        self.exact_first = exact_first
        self.exact_cells = exact_cells  # None: chosen from the attention mass seen so far
        self.bos = bos
        self.ropes, self.span = ropes or {}, span if ropes else 0
        self.mass, self.n_mass = np.zeros(SINK_MAX), 0
        self.layers = [il for il in range(ident.n_layer) if ident.has_kv(il)]
        self.partner = {il: rope.pair_partner(ident.head_dim_k[il], min(ident.n_rot, ident.head_dim_k[il]),
                                              bool(ident.rope_neox)) if ident.rope_neox is not None
                        else np.arange(ident.head_dim_k[il]) for il in self.layers}
        self.sk = np.zeros((ident.n_layer, len(cands)))
        self.sv = np.zeros((ident.n_layer, len(cands)))
        self.sk_plain = np.zeros((ident.n_layer, len(cands)))  # keys not rebalanced (still centred)
        self.sv_plain = np.zeros((ident.n_layer, len(cands)))  # values not centred
        self.mom = {il: _Moments() for il in self.layers}
        self.n_done = 0
        self.workers = workers

    def add(self, chunk: dict[int, collect.LayerActivations], track_first: bool) -> None:
        """One chunk: the running statistics first, then every layer scored (layers in parallel threads: numpy
        releases the GIL in its array work, and llama.cpp waits meanwhile)."""
        skip_first = self.exact_first or self.center_keys or self.rebalance_keys or self.center_values
        first = {il: act.k[0] for il, act in chunk.items()}
        chunk = self._moved(chunk, self.offset(self.n_done))
        for il, act in chunk.items():
            self.mom[il].add(act, skip_first=skip_first, track_first=track_first, k_first=first[il])
            m = sink_mass(act)
            if m is not None:
                self.mass += m
                self.n_mass += 1
        n_exact = self.n_exact()
        exact = np.arange(n_exact) if n_exact else np.array([0]) if self.exact_first and track_first else None

        def score(item) -> tuple[int, dict, dict]:
            il, act = item
            m = self.mom[il]
            common = dict(kq_scale=collect.estimate_kq_scale(act), seed=self.seed + self.n_done, **self.opts,
                          k_mean=m.k_mean() if self.center_keys else None, exact_rows=exact)
            k_scale = m.scales(self.partner[il]) if self.rebalance_keys else None
            v_mean = m.v_mean() if self.center_values else None
            res = scoring.score_layer(act.q, act.k, act.v, act.attn, self.fit[il], k_scale=k_scale, v_mean=v_mean,
                                      **common)
            # the same without the key scales and the value mean: each layer keeps what scores lower (scores())
            alt = scoring.score_layer(act.q, act.k, act.v, act.attn, self.fit[il], **common) \
                if k_scale is not None or v_mean is not None else res
            return il, res, alt

        with scoring.single_thread_blas(), ThreadPoolExecutor(self.workers) as pool:  # parallel over layers only
            for il, res, alt in pool.map(score, chunk.items()):
                for j, name in enumerate(self.cands):
                    self.sk[il, j] += res[name][0] if name in res else UNFIT
                    self.sv[il, j] += res[name][1] if name in res else UNFIT
                    self.sk_plain[il, j] += alt[name][0] if name in alt else UNFIT
                    self.sv_plain[il, j] += alt[name][1] if name in alt else UNFIT
        self.n_done += 1

    def offset(self, i: int) -> int:
        """The position chunk ``i`` is scored at (0 for chunk 0, and for every chunk without a span)."""
        return int((i * POSITION_STEP) % 1.0 * self.span)

    def _moved(self, chunk: dict[int, collect.LayerActivations], offset: int) -> dict[int, collect.LayerActivations]:
        """The chunk's queries and keys turned by RoPE as if it started at ``offset`` (values and attention as
        they are: attention reads relative positions)."""
        if not offset:
            return chunk
        out = {}
        for il, act in chunk.items():
            p, shift = self.ropes[il], np.full(len(act.k), offset)
            out[il] = collect.LayerActivations(q=rope.rope(act.q, shift, p), k=rope.rope(act.k, shift, p), v=act.v,
                                               attn=act.attn)
        return out

    def _pays(self, il: int, with_it: np.ndarray, without: np.ndarray) -> bool:
        """Does a layer's transform lower its scores? Compared over the layer's quantized candidates (geometric mean
        of the score ratios: every type the solver may choose counts alike)."""
        j = [j for j, c in enumerate(self.cands) if c in self.fit[il] and cachetypes.get(c).is_quantized
             and with_it[j] < UNFIT and without[j] < UNFIT]
        if not j:
            return True
        tiny = 1e-30
        return float(np.sum(np.log(with_it[j] + tiny) - np.log(without[j] + tiny))) <= 0.0

    def n_exact(self) -> int:
        """The exact cells: as asked, or chosen from the attention mass seen so far."""
        if self.exact_cells is not None:
            return self.exact_cells
        n = choose_exact_cells(self.mass / self.n_mass if self.n_mass else None)
        # position 0 alone: a BOS kept exact by the centring vectors holds it at no cost (calibration.md)
        return 0 if n == 1 and self.exact_first and self.bos else n

    def scores(self, settings: dict) -> Scores:
        ident, mom = self.ident, self.mom
        sk, sv = self.sk / max(self.n_done, 1), self.sv / max(self.n_done, 1)  # layers without a cache stay 0
        # rebalanced keys and centred values where they pay, layer by layer (a sink that no exact row holds, for
        # one, can make a value mean or key scales cost more than they save): the scores of what each layer keeps
        scaled = [il for il in self.layers if self.rebalance_keys and self._pays(il, self.sk[il], self.sk_plain[il])]
        centred_v = [il for il in self.layers if self.center_values and self._pays(il, self.sv[il], self.sv_plain[il])]
        for il in self.layers:
            if il not in scaled:
                sk[il] = self.sk_plain[il] / max(self.n_done, 1)
            if il not in centred_v:
                sv[il] = self.sv_plain[il] / max(self.n_done, 1)
        exact_first = self.exact_first
        if exact_first and any(mom[il].first_varies or mom[il].k_first is None for il in self.layers):
            print("qaq-gguf: the first token's K/V differ between chunks: it is not kept exact", file=sys.stderr)
            exact_first = False
        n_exact = self.n_exact()
        settings = dict(settings, n_chunks=self.n_done, center_keys=self.center_keys,
                        rebalance_keys=self.rebalance_keys, center_values=self.center_values,
                        rebalanced_layers=len(scaled) if self.rebalance_keys else 0,
                        centred_value_layers=len(centred_v) if self.center_values else 0,
                        exact_first=exact_first, exact_cells=n_exact,
                        exact_cells_chosen=self.exact_cells is None)
        if self.n_mass:
            settings["sink_mass"] = [round(float(x), 5) for x in self.mass / self.n_mass]
        if not exact_first:
            settings.pop("exact_first_token", None)

        def flat(get, size) -> np.ndarray:
            return np.concatenate([np.asarray(get(il, mom[il]), np.float32).ravel() if il in mom
                                   else np.zeros(size(il), np.float32) for il in range(ident.n_layer)])

        nk, nv = ident.n_embd_k, ident.n_embd_v
        on = self.n_done > 0
        ones = np.ones  # a layer whose keys are not rebalanced has scales 1, one whose values are not centred mean 0
        return Scores(ident, self.cands, sk, sv, settings,
                      k_mean=flat(lambda il, m: m.k_mean(), nk) if self.center_keys and on else None,
                      k_scale=flat(lambda il, m: m.scales(self.partner[il]) if il in scaled else
                                   ones(nk(il), np.float32), nk) if self.rebalance_keys and on else None,
                      v_mean=flat(lambda il, m: m.v_mean() if il in centred_v else np.zeros(nv(il), np.float32), nv)
                      if self.center_values and on else None,
                      k_first=flat(lambda il, m: m.k_first, nk) if exact_first and on else None,
                      v_first=flat(lambda il, m: m.v_first, nv) if exact_first and on else None,
                      exact_cells=n_exact)


def _weights(ident: profile.ModelIdentity, n_ctx: int | None) -> tuple[list[int], list[int]]:
    wk, wv = [], []
    for il in range(ident.n_layer):
        if n_ctx is None:
            nk = ident.n_head_kv[il] * ident.head_dim_k[il] if ident.has_kv(il) else 0
            nv = ident.n_head_kv[il] * ident.head_dim_v[il] if ident.has_kv(il) else 0
        else:
            nk, nv = profile.layer_values(ident, il, n_ctx)
        wk.append(nk)
        wv.append(nv)
    return wk, wv


def _scored(scores: Scores, candidates: Sequence[str] | None) -> list[str]:
    """The candidates the solver may use: those asked for (all scored ones by default), less those no layer of the
    model can hold (calibration left them out, with a line saying why). One that could be used but was not measured
    in these scores is refused by name."""
    if not candidates:
        return list(scores.candidates)
    per_layer = _fits_per_layer(scores.ident, candidates)
    cands = [c for c in candidates if c in scores.candidates or any(c in fit for fit in per_layer.values())]
    missing = [c for c in cands if c not in scores.candidates]
    if missing:
        raise ValueError(f"candidates {', '.join(missing)} were not measured in these scores (measured: "
                         f"{', '.join(scores.candidates)}): calibrate with them, or leave them out of --candidates")
    return cands


def _costs(scores: Scores, cands: list[str]) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Cost matrices for the solver: each layer's scores times its measured gain, or keys' times KEY_WEIGHT where
    the scores carry no gains; a candidate whose blocks do not divide a layer's head size is forbidden."""
    idx = [scores.candidates.index(c) for c in cands]
    if scores.gain_k is not None and scores.gain_v is not None:
        ck = scores.k[:, idx] * scores.gain_k[:, None]
        cv = scores.v[:, idx] * scores.gain_v[:, None]
    else:
        ck = scores.k[:, idx] * KEY_WEIGHT
        cv = scores.v[:, idx].copy()
    for il in range(scores.ident.n_layer):
        if not scores.ident.has_kv(il):
            continue
        for j, c in enumerate(cands):
            if not cachetypes.fits(c, scores.ident.head_dim_k[il]):
                ck[il, j] = np.inf
            if not cachetypes.fits(c, scores.ident.head_dim_v[il]):
                cv[il, j] = np.inf
    return ck, cv, [cachetypes.bits(c) for c in cands]


def allocate(scores: Scores, *, avg_bits: float | None = None, max_kv_bytes: int | None = None,
             n_ctx: int | None = None, candidates: Sequence[str] | None = None,
             provenance: dict | None = None) -> profile.Profile:
    """The profile with the least predicted error whose size fits the budget.

    ``avg_bits``: average bits per cached value over every layer's K and V, block scales included (4.5 = the size
    of a uniform q4_0 cache). ``max_kv_bytes`` with ``n_ctx``: the whole cache at that context length fits in that
    many bytes, sliding-window layers counted with the cells they really hold. Exactly one of the two."""
    if (avg_bits is None) == (max_kv_bytes is None):
        raise ValueError("give one budget: avg_bits, or max_kv_bytes with n_ctx")
    if max_kv_bytes is not None and not n_ctx:
        raise ValueError("max_kv_bytes needs n_ctx (the context length the cache must hold)")
    cands = _scored(scores, candidates)
    ck, cv, bits = _costs(scores, cands)
    wk, wv = _weights(scores.ident, n_ctx if max_kv_bytes is not None else None)
    if avg_bits is not None:
        budget = solver.budget_from_avg_bits(avg_bits, wk, wv)
    else:
        budget = solver.budget_from_bytes(max_kv_bytes)
    try:
        sol = solver.solve(ck, cv, bits, wk, wv, budget)
    except ValueError:
        smallest = cands[int(np.argmin(bits))]
        need = (f"{cachetypes.bits(smallest):g} bits per value" if avg_bits is not None else
                f"{profile.kv_bytes(profile.make_profile(scores.ident, smallest, smallest), n_ctx)} bytes at "
                f"n_ctx={n_ctx}")
        raise ValueError(f"the budget is below the smallest cache these candidates can make ({need})") from None
    return _profile_from(scores, cands, sol, avg_bits=avg_bits, max_kv_bytes=max_kv_bytes, n_ctx=n_ctx,
                         provenance=provenance)


def _profile_from(scores: Scores, cands: list[str], sol: solver.Allocation, *, avg_bits=None, max_kv_bytes=None,
                  n_ctx=None, provenance=None) -> profile.Profile:
    tk = [cands[j] for j in sol.choice_k]
    tv = [cands[j] for j in sol.choice_v]
    prov = {"method": f"qaq-{scores.settings.get('method', 'measured')}", "predicted_error": float(sol.cost)}
    if scores.gain_k is None:
        prov["key_weight"] = KEY_WEIGHT
    prov.update({f"calib_{k}": v for k, v in scores.settings.items()})
    if avg_bits is not None:
        prov["budget_avg_bits"] = float(avg_bits)
    if max_kv_bytes is not None:
        prov["budget_kv_bytes"] = int(max_kv_bytes)
        prov["budget_n_ctx"] = int(n_ctx)
    prov.update(provenance or {})
    p = profile.make_profile(scores.ident, tk, tv, prov)
    p.candidates = list(scores.candidates)
    p.score_k = scores.k
    p.score_v = scores.v
    p.gain_k, p.gain_v = scores.gain_k, scores.gain_v
    p.k_mean, p.k_scale, p.v_mean = centring_for(scores, tk, tv)
    p.stats = {k: getattr(scores, k) for k in ("k_mean", "v_mean", "k_first", "v_first")
               if getattr(scores, k) is not None}
    p.exact_cells = scores.exact_cells
    return p


def centring_for(scores: Scores, type_k: Sequence[str], type_v: Sequence[str]):
    """(k_mean, k_scale, v_mean) a profile with these per-layer types stores: the calibrated means, moved where the
    first token is kept exact so that its stored K and V rows are grid points of each layer's types
    (transforms.exact_centre). A value mean exists only with the first token kept exact or values centred."""
    ident = scores.ident
    k_mean = None if scores.k_mean is None else scores.k_mean.copy()
    v_mean = None if scores.v_mean is None else scores.v_mean.copy()
    if scores.k_first is not None and not scores.exact_cells:  # exact cells hold the first token themselves
        k_mean = np.zeros(ident.n_key_mean(), np.float32) if k_mean is None else k_mean
        v_mean = np.zeros(ident.n_value_mean(), np.float32) if v_mean is None else v_mean
        ok, ov = 0, 0
        for il in range(ident.n_layer):
            nk, nv = ident.n_embd_k(il), ident.n_embd_v(il)
            if nk:
                shape_k = (ident.n_head_kv[il], ident.head_dim_k[il])
                shape_v = (ident.n_head_kv[il], ident.head_dim_v[il])
                scale = scores.k_scale[ok:ok + nk].reshape(shape_k) if scores.k_scale is not None else None
                ck, _ = transforms.exact_centre(scores.k_first[ok:ok + nk].reshape(shape_k),
                                                k_mean[ok:ok + nk].reshape(shape_k), type_k[il], scale=scale)
                cv, _ = transforms.exact_centre(scores.v_first[ov:ov + nv].reshape(shape_v),
                                                v_mean[ov:ov + nv].reshape(shape_v), type_v[il], is_v=True)
                k_mean[ok:ok + nk], v_mean[ov:ov + nv] = ck.ravel(), cv.ravel()
            ok, ov = ok + nk, ov + nv
    return k_mean, scores.k_scale, v_mean


def frontier(scores: Scores, avg_bits: Sequence[float] | None = None, *, candidates: Sequence[str] | None = None,
             provenance: dict | None = None) -> list[profile.Profile]:
    """Profiles along the predicted quality/size frontier (default: a 0.25-bit grid over the feasible range),
    one per distinct allocation."""
    cands = _scored(scores, candidates)
    ck, cv, bits = _costs(scores, cands)
    wk, wv = _weights(scores.ident, None)
    total = max(sum(wk) + sum(wv), 1)
    out, seen = [], set()
    for sol in solver.frontier(ck, cv, bits, wk, wv, avg_bits):
        key = (tuple(sol.choice_k), tuple(sol.choice_v))
        if key not in seen:
            seen.add(key)
            out.append(_profile_from(scores, cands, sol, avg_bits=sol.budget_bits / total, provenance=provenance))
    return out


def scores_from_profile(p: profile.Profile) -> Scores:
    """The calibration scores stored in a profile (so a new budget needs no new calibration run)."""
    if not p.candidates or p.score_k is None:
        raise profile.ProfileError("this profile carries no calibration scores (it was not made by calibrate)")
    n, c = p.model.n_layer, len(p.candidates)
    settings = {k[len("calib_"):]: v for k, v in p.provenance.items() if k.startswith("calib_")}
    st = p.stats
    # schema-1 profiles stored the plain mean as qaq.kv.k_mean and no statistics
    return Scores(p.model, list(p.candidates), np.asarray(p.score_k, float).reshape(n, c),
                  np.asarray(p.score_v, float).reshape(n, c), settings,
                  k_mean=st.get("k_mean", p.k_mean), k_scale=p.k_scale, v_mean=st.get("v_mean"),
                  k_first=st.get("k_first"), v_first=st.get("v_first"), exact_cells=p.exact_cells,
                  gain_k=p.gain_k, gain_v=p.gain_v)
