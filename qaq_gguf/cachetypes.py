"""KV-cache types that llama.cpp accepts for ``-ctk`` / ``-ctv``, one row per type.

Sizes come from gguf-py's ``GGML_QUANT_SIZES`` so they match ggml exactly. A new
cache type is added as one more row in ``_TYPES`` (a type unknown to gguf-py can be
given as a literal ``CacheType(...)``).

This module depends only on the standard library and ``gguf``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@dataclass(frozen=True)
class CacheType:
    """One KV-cache storage type.

    ``type_id`` is the ggml type id (``enum ggml_type``); ``block_size`` values are
    stored in ``type_size`` bytes.
    """

    name: str
    type_id: int
    block_size: int
    type_size: int
    is_quantized: bool

    @property
    def bits(self) -> float:
        """Bits per stored value, block scales included (q4_0: 4.5)."""
        return self.type_size * 8 / self.block_size


def _from_gguf(name: str, is_quantized: bool) -> CacheType:
    qtype = GGMLQuantizationType[name.upper()]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return CacheType(name, int(qtype), block_size, type_size, is_quantized)


# The -ctk/-ctv whitelist (common/arg.cpp kv_cache_types), finest first.
_TYPES: tuple[CacheType, ...] = (
    _from_gguf("f32", False),
    _from_gguf("f16", False),
    _from_gguf("bf16", False),
    _from_gguf("q8_0", True),
    _from_gguf("q5_1", True),
    _from_gguf("q5_0", True),
    _from_gguf("q4_1", True),
    _from_gguf("q4_0", True),
    _from_gguf("iq4_nl", True),
    # qaq-gguf's own types (patches/0004; gguf-py does not know them): qaq_gguf/quants.py, docs/cache-types.md
    CacheType("qaq3", 43, 32, 14, True),
    CacheType("qaq2", 44, 32, 10, True),
    # the lean qaq types: one fp16 scale per 128 values (head sizes that are multiples of 128)
    CacheType("qaq4l", 45, 128, 66, True),
    CacheType("qaq3l", 46, 128, 50, True),
    CacheType("qaq2l", 47, 128, 34, True),
    # their head-64 siblings: one fp16 scale per 64 values (patches/0024; head sizes that are multiples of 64)
    CacheType("qaq4h", 48, 64, 34, True),
    CacheType("qaq3h", 49, 64, 26, True),
    CacheType("qaq2h", 50, 64, 18, True),
    # the trellis-coded types: 3 or 2 bits per value through a 256-state trellis, one fp16 scale per 64 values
    # (patches/0032; head sizes that are multiples of 64)
    CacheType("tcq3", 51, 64, 26, True),
    CacheType("tcq2", 52, 64, 18, True),
)

TYPES: dict[str, CacheType] = {t.name: t for t in _TYPES}

DEFAULT_CANDIDATES: tuple[str, ...] = ("f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "qaq4h", "qaq4l",
                                       "qaq3", "qaq3h", "tcq3", "qaq3l", "qaq2", "qaq2h", "tcq2", "qaq2l")


def names() -> list[str]:
    """Names of all known cache types."""
    return list(TYPES)


def get(name: str) -> CacheType:
    """Look up a cache type by its llama.cpp name (``"q4_0"``); case-insensitive."""
    t = TYPES.get(name.lower()) if isinstance(name, str) else None
    if t is None:
        raise ValueError(f"unknown KV cache type {name!r}; known types: {', '.join(TYPES)}")
    return t


def by_id(type_id: int) -> CacheType | None:
    """The cache type with ggml type id ``type_id``, or None."""
    return next((t for t in _TYPES if t.type_id == type_id), None)


def bits(name: str) -> float:
    """Bits per value of cache type ``name``, block scales included."""
    return get(name).bits


def fits(name: str, n: int) -> bool:
    """Whether rows of ``n`` values (a head's K or V row) can be stored in cache type ``name``: whole blocks."""
    return n > 0 and n % get(name).block_size == 0


def row_bytes(name: str, n: int) -> int:
    """Bytes taken by ``n`` consecutive values (one row) of cache type ``name``."""
    t = get(name)
    if n < 0 or n % t.block_size != 0:
        raise ValueError(f"{t.name}: row length {n} is not a multiple of the block size {t.block_size}")
    return n // t.block_size * t.type_size
