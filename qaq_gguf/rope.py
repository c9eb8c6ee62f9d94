"""RoPE as llama.cpp applies it, in numpy: for methods that quantize keys before RoPE (KVQuant, AQUA-KV, CQ).

The cache holds keys after RoPE; such a method un-rotates them with the token positions (:func:`unrope`),
quantizes, and rotates the reconstruction back (:func:`rope`). The parameters come from the model's GGUF
metadata (:func:`rope_params`) the way llama.cpp's loader reads them: ``{arch}.rope.freq_base`` (default 10000),
linear scaling ``{arch}.rope.scaling.factor``, and for sliding-window layers the architecture's own SWA base.
Only plain and NeoX RoPE with linear scaling are ported; YaRN, LongRoPE and multi-section RoPE are refused.

Which dimensions RoPE rotates together (:func:`pair_partner`) is also what the key transforms and the lab's codes
by RoPE pair are built on: it has this one home.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

if TYPE_CHECKING:
    from .profile import ModelIdentity

# architectures whose sliding-window layers use {arch}.rope.freq_base_swa, default 10000 (llama-hparams.h), with
# freq_scale 1; elsewhere SWA layers share the global base
_SWA_BASE_ARCHS = ("gemma3", "gemma3n")


def pair_partner(head_dim: int, n_rot: int, neox: bool) -> np.ndarray:
    """For each dimension of a head, the dimension RoPE rotates it with (itself from n_rot on)."""
    p = np.arange(head_dim)
    half = n_rot // 2
    if neox:
        p[:half], p[half:n_rot] = np.arange(half, n_rot), np.arange(half)
    else:
        p[:n_rot:2], p[1:n_rot:2] = np.arange(1, n_rot, 2), np.arange(0, n_rot, 2)
    return p


class RopeError(ValueError):
    """The model's RoPE is not one this port reproduces."""


@dataclass(frozen=True)
class RopeParams:
    n_rot: int          # rotated dimensions (the first n_rot of each head)
    neox: bool          # pairs (i, i + n_rot/2) instead of (2i, 2i + 1)
    freq_base: float
    freq_scale: float   # 1 / linear scaling factor

    def partner(self, head_dim: int) -> np.ndarray:
        """For each dimension, the one it is rotated with (:func:`pair_partner`)."""
        return pair_partner(head_dim, min(self.n_rot, head_dim), self.neox)

    def pairs(self, head_dim: int) -> np.ndarray:
        """(n_pairs, 2) dimension indices rotated together, in order of the first; dimensions >= n_rot are not
        rotated."""
        p = self.partner(head_dim)
        i = np.flatnonzero(p > np.arange(head_dim))
        return np.stack([i, p[i]], axis=1)

    def theta(self, pos: np.ndarray) -> np.ndarray:
        """(len(pos), n_rot/2) rotation angles, computed as ggml does (float32 powers of the base)."""
        half = self.n_rot // 2
        inv = np.power(np.float32(self.freq_base), -2.0 * np.arange(half, dtype=np.float32) / self.n_rot,
                       dtype=np.float32)
        return (np.asarray(pos, np.float32)[:, None] * np.float32(self.freq_scale)) * inv[None, :]


def rope_params(model_path: str | Path, ident: ModelIdentity, layers: Iterable[int]) -> dict[int, RopeParams]:
    """RoPE of each of ``layers`` of the model ``ident`` describes (profile.ModelIdentity: its sliding-window layers,
    key head sizes and rope type, ``rope_neox`` None for a model without RoPE), read once from the GGUF metadata."""
    from ._native import gguf_header

    meta, _ = gguf_header(model_path)
    arch = meta.get("general.architecture", "")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    neox = ident.rope_neox
    if neox is None:
        raise RopeError(f"{arch}: the model has no RoPE (or one llama.cpp does not report)")
    scaling = get("rope.scaling.type", "linear") or "linear"
    if scaling not in ("linear", "none"):
        raise RopeError(f"{arch}: rope scaling {scaling!r} is not ported (linear only)")
    if f"{arch}.rope.dimension_sections" in meta:
        raise RopeError(f"{arch}: multi-section RoPE is not ported")
    factor = float(get("rope.scaling.factor", 0.0) or get("rope.scale_linear", 0.0) or 0.0)
    base = float(get("rope.freq_base", 10000.0))
    scale = 1.0 if factor == 0 else 1.0 / factor
    base_swa = float(get("rope.freq_base_swa", 10000.0))
    out = {}
    for il in layers:
        swa = ident.is_swa[il] and arch in _SWA_BASE_ARCHS
        out[il] = RopeParams(n_rot=int(get("rope.dimension_count", ident.head_dim_k[il])), neox=neox,
                             freq_base=base_swa if swa else base, freq_scale=1.0 if swa else scale)
    return out


def _rotate(x: np.ndarray, pos: np.ndarray, p: RopeParams, sign: float) -> np.ndarray:
    x = np.asarray(x, np.float32)
    out = x.copy()
    th = p.theta(pos)  # (n, half)
    c, s = np.cos(th), np.sin(th) * np.float32(sign)
    idx = p.pairs(x.shape[-1])
    a, b = x[..., idx[:, 0]], x[..., idx[:, 1]]
    shape = (len(pos),) + (1,) * (x.ndim - 2) + (idx.shape[0],)
    c, s = c.reshape(shape), s.reshape(shape)
    out[..., idx[:, 0]] = a * c - b * s
    out[..., idx[:, 1]] = a * s + b * c
    return out


def rope(x: np.ndarray, pos: np.ndarray, p: RopeParams) -> np.ndarray:
    """x (tokens, heads, head_dim) rotated to positions pos."""
    return _rotate(x, pos, p, 1.0)


def unrope(x: np.ndarray, pos: np.ndarray, p: RopeParams) -> np.ndarray:
    """The inverse of :func:`rope`: keys as they were before RoPE."""
    return _rotate(x, pos, p, -1.0)
