"""numpy reference of qaq-gguf's own cache types, byte for byte what ggml writes.

``qaq3`` and ``qaq2`` store 32 values per block: two ue5m3 scales (the top byte of an fp16 without its sign, one
per 16 values) and an index per value into a fixed symmetric int8 codebook: 8 levels in 14 bytes (3.5 bits per
value), 4 levels in 10 bytes (2.5 bits). The lean types ``qaq4l``, ``qaq3l`` and ``qaq2l`` store 128 values per
block with one fp16 scale and 16, 8 or 4 levels: 66, 50 and 34 bytes (4.125, 3.125, 2.125 bits). Their head-64
siblings ``qaq4h``, ``qaq3h`` and ``qaq2h`` are the same with 64 values per block: 34, 26 and 18 bytes (4.25, 3.25,
2.25 bits), for head sizes that 128 does not divide. The trellis-coded ``tcq3`` and ``tcq2`` store 64 values per
block with one fp16 scale and 3 or 2 bits per value that drive a 256-state bit-shift trellis over a fixed float
codebook (``qaq_gguf/trellis.py``): 26 and 18 bytes (3.25, 2.25 bits). The C layouts
and the quantizer this module ports, operation for operation, are ``native/ggml/ggml-qaq.h`` and ``ggml-qaq.c``;
the design study behind them is ``docs/cache-types.md``.

Use :func:`quantize` / :func:`dequantize` for raw blocks and :func:`roundtrip` for the values the cache holds.
"""

from __future__ import annotations

import numpy as np

from . import trellis

QK = 32          # values per block
HALF = 16        # values per scale
NTRY = 11        # scale candidates amax * (0.45 + 0.07 i) / 127
UE5M3_MAX = 0xF7  # largest scale byte with a finite value (61440)

_T4 = np.array([-127, -96, -75, -58, -44, -31, -18, -6, 6, 18, 31, 44, 58, 75, 96, 127], dtype=np.float32)
_T3 = np.array([-127, -79, -45, -14, 14, 45, 79, 127], dtype=np.float32)
_T2 = np.array([-127, -38, 38, 127], dtype=np.float32)
KVALUES = {"qaq3": _T3, "qaq2": _T2, "qaq4l": _T4, "qaq3l": _T3, "qaq2l": _T2, "qaq4h": _T4, "qaq3h": _T3,
           "qaq2h": _T2}
BLOCK_BYTES = {"qaq3": 14, "qaq2": 10, "qaq4l": 66, "qaq3l": 50, "qaq2l": 34, "qaq4h": 34, "qaq3h": 26, "qaq2h": 18}
BLOCK_VALUES = {"qaq3": 32, "qaq2": 32, "qaq4l": 128, "qaq3l": 128, "qaq2l": 128, "qaq4h": 64, "qaq3h": 64,
                "qaq2h": 64}
QKL = 128        # values per lean block
QKH = 64         # values per head-64 block
LEAN = ("qaq4l", "qaq3l", "qaq2l", "qaq4h", "qaq3h", "qaq2h")  # one fp16 scale per block

# The trellis types: bits per value, and their codebooks as float32 bits (ggml-qaq-common.h's QAQ_TCQ{3,2}_CODEBOOK,
# which trellis.codebook(k, 8) computed; tests/test_tcq_types.py checks all three agree) and walk scales (rho)
TCQ = {"tcq3": 3, "tcq2": 2}
QK_TCQ = 64
_TCQ3_BITS = (
    0xbe95da58, 0xbe7e1bdd, 0x3ff9d7ec, 0xbfc106d6, 0x3f30b227, 0x3e75da34, 0x3f9e9167, 0xbf487576,
    0xbef23f61, 0x3fcaa9c3, 0xc03d4579, 0xbf9649f3, 0x3e6d85f1, 0xbf2d3434, 0x3edba6be, 0xbe487197,
    0x3f73c89b, 0xbf3763dd, 0x3e9aeb77, 0xc00d72c2, 0x402122bc, 0xbfb79f7b, 0x3fa9bd2c, 0xbc002548,
    0x3f13c293, 0xbf065cad, 0x3ec29a70, 0x3c4f8299, 0xbf897d7f, 0x400df8e0, 0x3f52fa05, 0xbfcbfafe,
    0xbf8f749d, 0xbda63033, 0xbf1587e1, 0x3f1a8ab4, 0x3fe9b9db, 0x3faeffc0, 0xc0033e8b, 0x3f836213,
    0x3fe4e4c2, 0x3eab167f, 0xbea32aa4, 0x3eca78c7, 0xbd55d905, 0xbe2040df, 0xbeeef66b, 0x3f6e6b8b,
    0x3f43ba63, 0xbfc55316, 0xbec9eeff, 0x3fb53e2a, 0x3e99c4c7, 0xbf1ec997, 0x3ed8fe40, 0x3f639264,
    0xbf690b2e, 0x3f756b6c, 0xbb8d1c1c, 0xbf2cc1ac, 0x3eb2af07, 0xbe7b2a71, 0x3e238b31, 0x3f87186f,
    0xbf3055aa, 0x3e539b31, 0xbeab1371, 0x3e4f1392, 0x3f21b0b2, 0x3f797a69, 0x3fa2ffc5, 0x3f208234,
    0x3eaa87d0, 0xbec57aed, 0xbfe28bbf, 0x3fc96138, 0xbe5181b5, 0xbd0a3b10, 0x3e3c8965, 0xbf970a24,
    0x3ec96a46, 0x3f1ea21b, 0xbe0a08ad, 0xbf1e42a4, 0x3fa02b52, 0x3ef22866, 0x3a059f47, 0xbebe99f2,
    0xbfc0c143, 0xbd3d1ea7, 0xbf0582f5, 0xbf7acab3, 0x3f9d480b, 0x3eb4b6e5, 0xbea0bd49, 0x3f538f15,
    0xbf3e51af, 0x3e0b6471, 0xbf6c3dd4, 0x3f0865ca, 0x3fc9ea67, 0x3cbd73c0, 0x3f73b5c8, 0xbffc58f2,
    0xbd0b357e, 0xbf9c0f13, 0xbef15ccd, 0xbe2e0c98, 0x3f78bcdd, 0xbedca2dc, 0xbfcf33e7, 0xbf77df84,
    0x3fb81fa9, 0x3f46d1fe, 0x3e1a4038, 0xbfca9770, 0xbf74a56c, 0xbe3b8af2, 0xbf88d5c5, 0xbf7b7c01,
    0xc005913a, 0x3f1786fe, 0xbf44c6a1, 0x3fa5f292, 0xbdd3f65e, 0xbeedb424, 0x3fea4a74, 0xbf99fc84,
    0x3c1f8c9b, 0xbe86a7b1, 0x3fff9afa, 0x3ee26eed, 0xc03639e5, 0x3f2c0a07, 0xc010c8d8, 0x3f8d4154,
    0x3fa5a598, 0x3f4d9332, 0xbdfc77ca, 0xbfd8b4ee, 0x3e1edc48, 0xbf67fe39, 0x3f7ebb51, 0x3ed296f1,
    0xbeccfc36, 0xbd20f07a, 0xbfa67d60, 0x3f05eef0, 0x3e903c8d, 0xbf836b0a, 0xbf449ff5, 0xbfc5da2d,
    0xbba1b67b, 0xbf87efbe, 0xbfa9b10b, 0xbe9113b2, 0xbf37bf26, 0x3e9c5809, 0x3ecb01e0, 0x3d498e78,
    0xbf776136, 0x3ef3a9f7, 0x3fa2bff9, 0xbfb8dad7, 0xbfc42d17, 0x3f835bbb, 0x3f272577, 0xbe5a2385,
    0x3f181f4c, 0xc008083c, 0x3f80be17, 0xbefe6712, 0xbf112739, 0x3e5ac4f4, 0xbec19f0b, 0xc01dcaa7,
    0x3f0156cd, 0x3f76b3a5, 0x3d583089, 0x3e8b86c4, 0xbf2370c0, 0x3e2fcfdb, 0x40109cc3, 0xbe94b913,
    0x3fb965e3, 0x3eca67ac, 0x3e1637fc, 0x3d2f9d25, 0xbf01a971, 0x3f416460, 0xbfb4882e, 0x3ff32d68,
    0x3f0f0fc7, 0xbfbc51bc, 0x3f5e1b75, 0x3f35fda0, 0x3f8598fe, 0x3ec848bf, 0xbcba59e2, 0x3f11fd1f,
    0x3f512d8f, 0xbf249e90, 0xbf82601b, 0xbe92ebf6, 0xbf3aa7fc, 0x3d7c8a2b, 0xbfa81434, 0xbf46af2b,
    0xbde3d394, 0xbf812dfc, 0x3f8a37f2, 0x3f327ba8, 0x40038c23, 0x3eb5621b, 0xbed46cbe, 0x3fb64bb3,
    0xbf0cd498, 0xbfed7c97, 0x402a89ef, 0xbfb06218, 0xbf3cc9a2, 0x3f8f6d41, 0xbf67ca91, 0xbf49b041,
    0xbfe15ee5, 0xbf2af0d4, 0x3ea8e286, 0x3faa209a, 0x3fedd962, 0xbe109834, 0xbf8de08e, 0x3fcd2368,
    0xbe023b87, 0x3ee136bb, 0xbf0ae35b, 0xbf31843f, 0xc001032c, 0x3fca0ddc, 0x3fa6d0f1, 0x3f38e59f,
    0x40476610, 0xbf07f8d9, 0xbe9b26f6, 0x3dc9f3eb, 0xbd893d9f, 0xbf0c8c9a, 0x3d8d4288, 0xbf4bf452,
    0x3f28b088, 0xbf992829, 0x3eb8545f, 0x3f148f65, 0x4000fd04, 0xbf8f6cb2, 0x3f78e4c1, 0xbe9bc82b,
)
_TCQ2_BITS = (
    0xbd8f82f5, 0x3b87d762, 0x3faaedbc, 0xbfa5870d, 0x3f3a97fc, 0x3dda8f64, 0x3fb6a46c, 0xbf412428,
    0xbd9b0dee, 0x3fb1a29e, 0xc02bed23, 0xbf8298bb, 0x3ef060b9, 0xbf750271, 0x3efd602a, 0xbea6604b,
    0x3f97ab2e, 0xbf0fdcd7, 0x3d8ab54e, 0xc009abff, 0x4015bc50, 0xbfc435bf, 0x3f9869c7, 0xbcb5d7d4,
    0x3f3a107c, 0xbf31a340, 0x3ec4da58, 0xbe21f371, 0xbf816ded, 0x4007516e, 0x3f53b165, 0xbfcb5912,
    0xbf87904b, 0xbd0c87c3, 0xbf0c3a74, 0x3f1b693d, 0x3fe66b99, 0x3f86bfa4, 0xbff661c2, 0x3f1c55ef,
    0x3ffcd07f, 0x3e9d30d7, 0xbf1be348, 0x3edd53c0, 0x3e3da0f6, 0xbec1f041, 0xbef44e0c, 0x3f84b92d,
    0x3f2e634a, 0xbfd3b64b, 0xbf0c9c0e, 0x3fbe5a57, 0x3ea3574f, 0xbf3e1ef6, 0x3ef3bcb3, 0x3f85ae69,
    0xbf6ca8a0, 0x3f8594f6, 0x3e07683c, 0xbf238789, 0x3ec4ca30, 0xbed417e3, 0x3d85a3c6, 0x3f70762e,
    0xbf733d96, 0x3e2a8fac, 0xbed4e096, 0x3eaa8d31, 0x3ef52f60, 0x3f8dd864, 0x3f99a153, 0x3eccaa17,
    0x3e7909e0, 0xbe565272, 0xbfef7ea7, 0x3fc4231d, 0xbea2d67f, 0x3b229f5b, 0x3e8af490, 0xbf8d430d,
    0x3f33edd9, 0x3f6e43d5, 0xbc9d1b54, 0xbeff9cc3, 0x3fa04377, 0x3f0bb999, 0xbe1712d2, 0xbee09fd6,
    0xbfc58489, 0x3c831a8e, 0xbf037768, 0xbf82a450, 0x3fa95d47, 0x3e959e40, 0xbea9a61b, 0x3f49742e,
    0xbf29140d, 0x3e52643c, 0xbf75fa20, 0x3eef319f, 0x3fdac247, 0xbd17476e, 0x3f65d3a3, 0xbff06f3b,
    0xbd98806b, 0xbf9f6998, 0xbea4f17d, 0xbdd5b1b2, 0x3f6da321, 0xbed2aab2, 0xbfbf9631, 0xbf827c83,
    0x3fb35d57, 0x3f3573ae, 0x3d4c66b5, 0xbfb5e0a7, 0xbf543383, 0xbe0dab2b, 0xbf9473f2, 0xbf6d4932,
    0xbfff799a, 0x3eed0737, 0xbf3bf004, 0x3fc739ef, 0x3c4f31d2, 0xbefd76b3, 0x4000f365, 0xbfadabfc,
    0xbd865b84, 0xbe5eeb02, 0x3ffcae41, 0x3f1aefd3, 0xc03325e2, 0x3f2e14cc, 0xc00956f0, 0x3f9a7191,
    0x3f9efbc2, 0x3f3be66b, 0xbe736e9f, 0xbfce347c, 0xbd9fbfea, 0xbf736f81, 0x3f9e944a, 0x3f0ed748,
    0xbee903f2, 0x3c5d0491, 0xbfb4fabf, 0x3f22a922, 0x3e644f12, 0xbf5ef92f, 0xbf36d531, 0xbfc5c088,
    0x3d910486, 0xbf949e5e, 0xbfa5c302, 0xbe8230af, 0xbf4ef197, 0x3ed4c603, 0x3ef24994, 0xbdfe8bd9,
    0xbf55ad61, 0x3ecd0a0b, 0x3fa0a01b, 0xbfa8c5f7, 0xbfb81053, 0x3f96848f, 0x3f22da4f, 0xbe10a5ba,
    0x3ec8455d, 0xc001f682, 0x3f7e1d3f, 0xbef9d643, 0xbf0bef67, 0x3e9c879f, 0xbea62c03, 0xc01d04b4,
    0x3f0c70c7, 0x3f8b500a, 0xbd4ad32c, 0x3ea2a0e0, 0xbf4012ba, 0x3efa49a2, 0x4001fcea, 0xbe542807,
    0x3fc09d70, 0x3e9a8e90, 0x3e66d046, 0xbd9797e8, 0xbf2e6680, 0x3f3047a1, 0xbf927faa, 0x400470b3,
    0x3ebd2bd9, 0xbfa74ca5, 0x3f8210d5, 0x3f2dca6c, 0x3f806af2, 0x3eb1f993, 0xbe333e8b, 0x3f20685e,
    0x3f5ca6e9, 0xbf5386b7, 0xbf898b13, 0xbe6d3be6, 0xbf239532, 0x3deec24c, 0xbfc2dbec, 0xbf42f47b,
    0xbde5e87f, 0xbf6cda77, 0x3f9db19e, 0x3f0bc52a, 0x40023fbe, 0x3eb8bb8b, 0xbea5de40, 0x3fa2a361,
    0xbf3b37dc, 0xbff5499e, 0x4027fe2d, 0xbfaad1c9, 0xbf1e2e54, 0x3f831b86, 0xbf9ef173, 0xbf127b5e,
    0xbfd2a1a5, 0xbf3bcb41, 0x3eab4fea, 0x3fb9575e, 0x3ff3e24f, 0xbe273f18, 0xbf886d5d, 0x3fbea888,
    0xbe84618a, 0x3f097db7, 0xbef88336, 0xbf2e7129, 0xc0027b1a, 0x3fe1f11e, 0x3f989264, 0x3f00023a,
    0x4032fab4, 0xbf288508, 0xbe46f864, 0x3d56c9a7, 0x3dc6497b, 0xbeefdad7, 0xbddab480, 0xbf61d534,
    0x3f14da37, 0xbf971b0f, 0x3f0a1c39, 0x3f2b8382, 0x3fdad5e2, 0xbf967809, 0x3f563732, 0xbe63c9e1,
)
TCQ_CODEBOOK = {3: np.array(_TCQ3_BITS, np.uint32).view(np.float32), 2: np.array(_TCQ2_BITS, np.uint32).view(np.float32)}
TCQ_RHO = {3: np.float32(0.9), 2: np.float32(1.0)}
BLOCK_BYTES.update(tcq3=26, tcq2=18)
BLOCK_VALUES.update(tcq3=QK_TCQ, tcq2=QK_TCQ)


def _midpoints(t: np.ndarray) -> np.ndarray:
    return ((t[:-1] + t[1:]) / np.float32(2)).astype(np.float32)


MIDS = {name: _midpoints(t) for name, t in KVALUES.items()}


def ue5m3_to_float(b: np.ndarray) -> np.ndarray:
    """Decode ue5m3 scale bytes: the fp16 whose bits are ``b << 7``."""
    return (np.asarray(b, np.uint16) << 7).view(np.float16).astype(np.float32)


_UE5M3 = ue5m3_to_float(np.arange(UE5M3_MAX + 1, dtype=np.uint16))


def ue5m3_floor(v: np.ndarray) -> np.ndarray:
    """The largest scale byte whose value is <= v (0 where none, or where v is not positive)."""
    v = np.asarray(v, np.float32)
    b = np.searchsorted(_UE5M3, v, side="right") - 1
    return np.where(v > 0, np.clip(b, 0, UE5M3_MAX), 0).astype(np.int32)


def _nearest(v: np.ndarray, mids: np.ndarray) -> np.ndarray:
    """Index of the nearest level: the number of midpoints strictly below v (ties go down), as in C."""
    return (v[..., None] > mids).sum(axis=-1)


class _Grid:
    """Nearest-level lookup for one codebook whose midpoints are multiples of 1/2 (every table here): with
    ``c = ceil(2 v)``, a midpoint ``k / 2`` lies strictly below v exactly when ``k < c``, so the index
    :func:`_nearest` counts is a table entry of c clipped to the midpoints' range (NaN counts none, as in C's
    comparisons). Same indices as :func:`_nearest`, a few array passes instead of one per midpoint."""

    def __init__(self, table: np.ndarray, mids: np.ndarray):
        k = mids.astype(np.float64) * 2
        assert np.array_equal(k, np.round(k)), "midpoints must be multiples of 1/2"
        k = k.astype(np.int64)
        self.lo, self.hi = np.float32(k.min()), np.float32(k.max() + 1)
        idx = np.array([(k < c).sum() for c in range(int(k.min()), int(k.max()) + 2)])
        self.idx = idx.astype(np.uint8)
        self.level = table[idx].astype(np.float32)
        self.level2 = (self.level * self.level).astype(np.float32)

    def cell(self, v: np.ndarray) -> np.ndarray:
        """Table positions of v (float32, consumed): ceil(2 v) clipped to [lo, hi], minus lo."""
        np.multiply(v, np.float32(2), out=v)  # exact: doubling
        np.ceil(v, out=v)
        np.fmax(v, self.lo, out=v)  # NaN -> lo: no midpoint below
        np.fmin(v, self.hi, out=v)
        np.subtract(v, self.lo, out=v)
        return v.astype(np.intp)


GRIDS = {name: _Grid(KVALUES[name], MIDS[name]) for name in KVALUES}

_CHUNK = 1 << 16  # values per slice of the vectorised searches (keeps the temporaries in cache)


def _seqsum(p: np.ndarray) -> np.ndarray:
    """Sequential float32 sum over axis 0, from 0.0 in index order (the C loop's ``s += p[j]``)."""
    s = np.zeros(p.shape[1:], np.float32)
    for j in range(p.shape[0]):
        s += p[j]
    return s


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """amax, sequential float32 sum of squares and liveness of rows of x (n, m), as qaq_stats."""
    f32 = np.float32
    n = x.shape[0]
    amax = np.abs(x).max(axis=1) if n else np.zeros(0, f32)
    xt = np.ascontiguousarray(x.T)
    sumx2 = _seqsum(xt * xt)  # sequential float32 sums, as the C loop
    return amax, sumx2, (amax > 0) & np.isfinite(amax)


def _fit(xt: np.ndarray, inv_d: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """sum_j x_j t_j and sum_j t_j^2 (sequential float32) for rows xt (m, n) (one per column) under each
    inverse scale of inv_d (K, n), t_j the level nearest x_j * inv_d: two (K, n) arrays."""
    v = xt[:, None, :] * inv_d[None, :, :]  # (m, K, n), float32 products as C's x[j] * id
    c = grid.cell(v)
    t = grid.level[c]
    np.multiply(t, xt[:, None, :], out=v)
    return _seqsum(v), _seqsum(grid.level2[c])


def _best_scale(x: np.ndarray, name: str, amax: np.ndarray, sumx2: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Port of ``qaq_best_scale`` for rows of x (n, m): the least-squares scale after the candidate search and one
    refit (rows that are not live get garbage, masked by the caller). All candidate scales of a slice of rows are
    evaluated at once; the sums and the choice (first best on ties) are the C loop's, value for value."""
    n, m = x.shape
    out = np.empty(n, np.float32)
    step = max(1, _CHUNK // (m * NTRY))
    for s0 in range(0, n, step):
        sl = slice(s0, min(n, s0 + step))
        out[sl] = _best_scale_rows(np.ascontiguousarray(x[sl].T), GRIDS[name], amax[sl], sumx2[sl], live[sl])
    return out


_TRY = np.array([np.float32(0.45) + np.float32(0.07) * np.float32(i) for i in range(NTRY)], np.float32)


def _best_scale_rows(xt: np.ndarray, grid: _Grid, amax: np.ndarray, sumx2: np.ndarray,
                     live: np.ndarray) -> np.ndarray:
    f32 = np.float32
    a = np.where(live, amax, f32(1)).astype(f32)

    def fit(inv_d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sqx, sq2 = _fit(xt, inv_d, grid)
        ok = (sqx > 0) & (sq2 > 0)
        ds = (sqx / np.where(ok, sq2, f32(1))).astype(f32)
        err = (sumx2 - ds * sqx).astype(f32)
        return ok, ds, err

    best_err = np.full(a.shape, np.inf, f32)
    best_d = (a / f32(127)).astype(f32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = (a[None, :] * _TRY[:, None] / f32(127)).astype(f32)  # (NTRY, n): a * g / 127, as C
        ok, ds, err = fit((f32(1) / d).astype(f32))
        for i in range(NTRY):  # the C loop's updates, in its order
            upd = ok[i] & (err[i] < best_err)
            best_err = np.where(upd, err[i], best_err)
            best_d = np.where(upd, ds[i], best_d)
        ok, ds, err = fit((f32(1) / best_d).astype(f32)[None, :])
        best_d = np.where(ok[0] & (err[0] < best_err), ds[0], best_d).astype(f32)
    return best_d


def _nearest_index(x: np.ndarray, inv: np.ndarray, name: str) -> np.ndarray:
    """:func:`_nearest` of x * inv[:, None] for rows x (n, m): uint8 (n, m)."""
    g = GRIDS[name]
    return g.idx[g.cell((x * inv[:, None]).astype(np.float32))]


def _quantize_halves(x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Port of ``qaq_quantize_half`` for many 16-value halves at once: x (n, 16) float32 ->
    (scale bytes (n,), indices (n, 16))."""
    mids = MIDS[name]
    grid = GRIDS[name]
    f32 = np.float32
    n = x.shape[0]
    amax, sumx2, live = _stats(x)
    izero = int(_nearest(np.zeros(1, f32), mids)[0])
    best_d = _best_scale(x, name, amax, sumx2, live)
    xt = np.ascontiguousarray(x.T)  # (16, n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        b0 = ue5m3_floor(best_d)
        best_b = b0.copy()
        best_e = np.full(n, np.inf, f32)
        for c in range(2):
            b = b0 + c
            valid = b <= UE5M3_MAX
            d = _UE5M3[np.minimum(b, UE5M3_MAX)]
            inv = np.where(d > 0, f32(1) / np.where(d > 0, d, f32(1)), f32(0)).astype(f32)
            r = grid.level[grid.cell(xt * inv)]  # t_j
            r *= d
            np.subtract(xt, r, out=r)  # x_j - d * t_j
            r *= r
            e = _seqsum(r)
            e = np.where(d > 0, e, sumx2)
            upd = valid & (e < best_e)
            best_e = np.where(upd, e, best_e)
            best_b = np.where(upd, b, best_b)
        d = _UE5M3[best_b]
        inv = np.where(d > 0, f32(1) / np.where(d > 0, d, f32(1)), f32(0)).astype(f32)
        idx = _nearest_index(x, inv, name)
    idx = np.where((d > 0)[:, None] & live[:, None], idx, izero)
    best_b = np.where(live, best_b, 0)
    return best_b.astype(np.uint8), idx.astype(np.uint8)


def _pack_low2(idx: np.ndarray) -> np.ndarray:
    """qs bytes of (n, 32) indices: value j's low 2 bits at bits 2*(j/8) of byte j%8."""
    lo = idx & 3
    return (lo[:, 0:8] | lo[:, 8:16] << 2 | lo[:, 16:24] << 4 | lo[:, 24:32] << 6).astype(np.uint8)


def _pack_high1(idx: np.ndarray) -> np.ndarray:
    """qh bytes of (n, 32) 3-bit indices: value j's high bit at bit j%8 of byte j/8."""
    hi = (idx >> 2).reshape(idx.shape[0], 4, 8)
    return (hi << np.arange(8, dtype=np.uint8)).sum(axis=2).astype(np.uint8)


def _quantize_lean(blocks: np.ndarray, name: str) -> np.ndarray:
    """Port of ``quantize_row_qaq{4,3,2}{l,h}_ref``: (nb, 128 or 64) float32 -> (nb, block bytes) uint8."""
    f32 = np.float32
    qk = blocks.shape[1]
    mids = MIDS[name]
    nb = blocks.shape[0]
    amax, sumx2, live = _stats(blocks)
    best_d = _best_scale(blocks, name, amax, sumx2, live)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        h = np.where(live, np.minimum(best_d, f32(65504)), f32(0)).astype(np.float16)  # saturate, as C
        d = h.astype(f32)
        ok = (d > 0) & np.isfinite(d)
        h = np.where(ok, h, np.float16(0))
        inv = np.where(ok, f32(1) / np.where(ok, d, f32(1)), f32(0)).astype(f32)
        idx = _nearest_index(blocks, inv, name)
    izero = int(_nearest(np.zeros(1, f32), mids)[0])
    idx = np.where(ok[:, None], idx, izero).astype(np.uint8)
    sub = idx.reshape(nb * (qk // 32), 32)
    if name in ("qaq4l", "qaq4h"):
        codes = (sub[:, :16] | sub[:, 16:] << 4).astype(np.uint8).reshape(nb, qk // 2)
        parts = [codes]
    else:
        parts = [_pack_low2(sub).reshape(nb, qk // 4)]
        if name in ("qaq3l", "qaq3h"):
            parts.append(_pack_high1(sub).reshape(nb, qk // 8))
    return np.concatenate([h.reshape(nb, 1).view(np.uint8)] + parts, axis=1)


def _quantize_tcq(blocks: np.ndarray, k: int) -> np.ndarray:
    """Port of ``quantize_row_tcq{3,2}_ref`` (qaq_tcq_quantize_block): (nb, 64) float32 -> (nb, 26 or 18) uint8."""
    f32 = np.float32
    T = TCQ_CODEBOOK[k]
    nb = blocks.shape[0]
    amax, sumx2, live = _stats(blocks)
    live = live & ~np.isnan(sumx2)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        a = np.where(live, amax, f32(1)).astype(f32)
        u = (np.where(live[:, None], blocks, f32(0)) / a[:, None]).astype(f32)
        su2 = _seqsum(np.ascontiguousarray((u * u).T))
        su2 = np.where(live, su2, f32(1)).astype(f32)
        g = (TCQ_RHO[k] / np.sqrt(su2 / f32(QK_TCQ))).astype(f32)
        states = trellis.viterbi((u * g[:, None]).astype(f32), T, k, tagged=True)
        c = T[states]
        suc = _seqsum(np.ascontiguousarray((u * c).T))
        ok = live & (suc > 0)
        ds = ((su2 / np.where(ok, suc, f32(1))).astype(f32) * amax).astype(f32)  # the unshrunk scale
        h = np.where(ok, np.minimum(ds, f32(65504)), f32(0)).astype(np.float16)
    b = np.where(live[:, None], trellis.walk_inputs(states, k), 0).astype(np.uint32)
    if k == 3:
        w = (b.reshape(nb, 8, 8) << (3 * np.arange(8, dtype=np.uint32))).sum(axis=2, dtype=np.uint32)  # 24-bit words
        qs = np.stack([w & 0xFF, w >> 8 & 0xFF, w >> 16], axis=2).reshape(nb, 24)
    else:
        qs = (b.reshape(nb, 16, 4) << (2 * np.arange(4, dtype=np.uint32))).sum(axis=2, dtype=np.uint32)
    return np.concatenate([h.reshape(nb, 1).view(np.uint8), qs.astype(np.uint8)], axis=1)


def _tcq_inputs(qs: np.ndarray, k: int) -> np.ndarray:
    """The k-bit inputs (nb, 64) of tcq blocks' qs bytes (nb, 24 or 16)."""
    nb = qs.shape[0]
    q = qs.astype(np.uint32)
    if k == 3:
        w = (q[:, 0::3] | q[:, 1::3] << 8 | q[:, 2::3] << 16)[:, :, None]  # (nb, 8, 1)
        return ((w >> (3 * np.arange(8, dtype=np.uint32))) & 7).reshape(nb, QK_TCQ)
    return ((q[:, :, None] >> (2 * np.arange(4, dtype=np.uint32))) & 3).reshape(nb, QK_TCQ)


def quantize(x: np.ndarray, name: str) -> np.ndarray:
    """Quantize rows (last axis a multiple of the block size) to raw ``name`` blocks: uint8 (..., blocks * bytes)."""
    if name not in KVALUES and name not in TCQ:
        raise ValueError(f"unknown qaq type {name!r}; known: {', '.join([*KVALUES, *TCQ])}")
    x = np.asarray(x, np.float32)
    qk = BLOCK_VALUES[name]
    if x.shape[-1] % qk:
        raise ValueError(f"{name}: last dimension {x.shape[-1]} is not a multiple of {qk}")
    if name in TCQ:
        out = _quantize_tcq(x.reshape(-1, qk), TCQ[name])
        return out.reshape(*x.shape[:-1], x.shape[-1] // qk * BLOCK_BYTES[name])
    if name in LEAN:
        out = _quantize_lean(x.reshape(-1, qk), name)
        return out.reshape(*x.shape[:-1], x.shape[-1] // qk * BLOCK_BYTES[name])
    blocks = x.reshape(-1, QK)
    nb = blocks.shape[0]
    d, idx = _quantize_halves(blocks.reshape(-1, HALF), name)
    d = d.reshape(nb, 2)
    idx = idx.reshape(nb, QK).astype(np.uint8)
    parts = [d, _pack_low2(idx)]
    if name == "qaq3":
        parts.append(_pack_high1(idx))
    out = np.concatenate(parts, axis=1).astype(np.uint8)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK * BLOCK_BYTES[name])


def dequantize(data: np.ndarray, name: str) -> np.ndarray:
    """Raw ``name`` blocks (uint8, last axis a multiple of the block size) -> float32 values."""
    bb = BLOCK_BYTES[name]
    data = np.asarray(data, np.uint8)
    if data.shape[-1] % bb:
        raise ValueError(f"{name}: {data.shape[-1]} bytes is not a whole number of {bb}-byte blocks")
    blk = data.reshape(-1, bb)
    if name in TCQ:
        k = TCQ[name]
        d = np.ascontiguousarray(blk[:, 0:2]).view(np.float16).astype(np.float32)  # (nb, 1)
        st = trellis.states_from_inputs(_tcq_inputs(blk[:, 2:], k), k, trellis.STATE_BITS)
        y = (d * TCQ_CODEBOOK[k][st]).astype(np.float32)
        return y.reshape(*data.shape[:-1], data.shape[-1] // bb * QK_TCQ)
    if name in LEAN:
        qk = BLOCK_VALUES[name]
        ng = qk // 32  # 32-value groups per block
        d = np.ascontiguousarray(blk[:, 0:2]).view(np.float16).astype(np.float32)  # (nb, 1)
        nb = blk.shape[0]
        j = np.arange(32)
        if name in ("qaq4l", "qaq4h"):
            qs = blk[:, 2:2 + qk // 2].reshape(nb, ng, 16)
            idx = np.where(j < 16, qs[:, :, j % 16] & 0xF, qs[:, :, j % 16] >> 4)
        else:
            qs = blk[:, 2:2 + qk // 4].reshape(nb, ng, 8)
            idx = (qs[:, :, j % 8] >> (2 * (j // 8))) & 3
            if name in ("qaq3l", "qaq3h"):
                qh = blk[:, 2 + qk // 4:2 + qk // 4 + qk // 8].reshape(nb, ng, 4)
                idx = idx | ((qh[:, :, j // 8] >> (j % 8)) & 1) << 2
        y = (d[:, :, None] * KVALUES[name][idx]).reshape(nb, qk)
        return y.astype(np.float32).reshape(*data.shape[:-1], data.shape[-1] // bb * qk)
    d = ue5m3_to_float(blk[:, 0:2])
    qs = blk[:, 2:10]
    j = np.arange(QK)
    idx = (qs[:, j % 8] >> (2 * (j // 8))) & 3
    if name == "qaq3":
        qh = blk[:, 10:14]
        idx = idx | ((qh[:, j // 8] >> (j % 8)) & 1) << 2
    y = d[:, j // HALF] * KVALUES[name][idx]
    return y.astype(np.float32).reshape(*data.shape[:-1], data.shape[-1] // bb * QK)


def roundtrip(x: np.ndarray, name: str) -> np.ndarray:
    """The values a ``name`` cache holds for x (same shape, float32)."""
    x = np.asarray(x, np.float32)
    return dequantize(quantize(x, name), name).reshape(x.shape)
