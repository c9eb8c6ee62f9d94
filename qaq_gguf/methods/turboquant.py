"""TurboQuant (Zandieh, Daliri, Hadian, Mirrokni, arXiv 2504.19874): random rotation + Lloyd-Max scalar codes.

What is followed:

- **TurboQuant_mse** (§3.1, Algorithm 1). Each head vector x is split into its norm (stored in fp16) and the unit
  vector u = x / ||x||, which is rotated by a random orthogonal matrix Pi (seeded; QR of a Gaussian matrix with
  the signs of R's diagonal, i.e. Haar-distributed). After the rotation every coordinate of Pi u has the same
  distribution, close to N(0, 1/d) for the head sizes of LLMs, and nearly independent of the others, so each is
  quantized on its own with the b-bit **Lloyd-Max** codebook of that distribution (:func:`lloyd_max`, computed
  numerically for N(0, 1) and scaled by 1/sqrt(d)); the reconstruction is ||x|| * Pi^T c[idx].
- **TurboQuant_prod** (§3.2, Algorithm 2), setting ``"b+qjl"``, keys only: TurboQuant_mse with b-1 bits, then the
  residual r = u - u_mse is stored as a 1-bit QJL sketch sign(S r) with S in R^{d x d} i.i.d. N(0, 1) and its norm
  gamma = ||r|| (fp16); the reconstruction u_mse + sqrt(pi/2)/d * gamma * S^T sign(S r) makes q.x~ an unbiased
  estimate of q.x (Theorem 2). That estimate is linear in q, so rewriting the key alone reproduces it exactly for
  every query head. Values always use TurboQuant_mse at b bits (the paper's inner-product variant is for keys).
- Applied to K (post-RoPE, as cached) and V, every layer, every token: no fp16 window, no sink token.

Bits per value: b + 16/d (the fp16 norm) for TurboQuant_mse; b + 32/d for TurboQuant_prod ((b-1) + 1 bits, the norm
and gamma). For d = 256 and setting ``"3+qjl"``: K (2 + 1) + 32/256 = 3.125, V 3 + 16/256 = 3.0625.

Departures and simulation approximations:

- The codebook is Lloyd-Max for the Gaussian N(0, 1/d), not for the exact coordinate law of a uniform point on the
  sphere (a scaled Beta, f(x) ~ (1 - x^2)^((d-3)/2)) the paper optimizes for. The levels differ by at most
  0.2/0.5/0.8% at d = 256 and 0.4/1.0/1.6% at d = 128 (b = 2/3/4), the Gaussian's outermost being the wider.
- The paper's fractional settings (2.5 and 3.5 bits: a set of outlier channels at one bit more, §4.3) are not
  implemented; integer b only.
- One rotation (and one QJL matrix) per head size, shared by every layer, head and by K and V.
- The reconstruction is stored in the f16 cache (rounding ~5e-4 relative, far below the code's error).

qaq-gguf's own cache types ``qaq3`` and ``qaq2`` (``qaq_gguf.quants``) are of this family: llama.cpp's Hadamard
rotation of each head, then the 3-bit / 2-bit Gaussian Lloyd-Max levels (scaled to +-127 in int8: -127 -79 -45 -14
14 45 79 127 and -127 -38 38 127), but with a ue5m3 block scale per 16 values (3.5 / 2.5 bits) instead of one norm
per vector, and a fixed Walsh-Hadamard matrix instead of a random rotation.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from statistics import NormalDist

import numpy as np

from . import Bits, MethodError, layer_shapes, row_bits

DEFAULTS = ("2", "3", "4", "3+qjl")
SEED = 0


def _ndtr(x: np.ndarray) -> np.ndarray:
    """The standard normal CDF, elementwise (erfc keeps the lower tail accurate; +-inf give 1 and 0)."""
    return np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in np.asarray(x, dtype=np.float64)])


@lru_cache(maxsize=None)
def lloyd_max(bits: int, iters: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """(levels, thresholds) of the minimum-MSE b-bit scalar quantizer of N(0, 1), by Lloyd's iteration on the exact
    Gaussian conditional means: levels (2^b,), thresholds (2^b - 1,) (the midpoints). Read-only float64 arrays."""
    k = 2 ** bits
    # start from the Gaussian quantiles of the cell centres
    c = np.array([NormalDist().inv_cdf((i + 0.5) / k) for i in range(k)])
    phi = lambda t: np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731
    for _ in range(iters):
        t = (c[:-1] + c[1:]) / 2
        lo = np.concatenate([[-np.inf], t])
        hi = np.concatenate([t, [np.inf]])
        mass = _ndtr(hi) - _ndtr(lo)
        new = (phi(lo) - phi(hi)) / mass
        if np.max(np.abs(new - c)) < 1e-13:
            c = new
            break
        c = new
    t = (c[:-1] + c[1:]) / 2
    c.setflags(write=False)
    t.setflags(write=False)
    return c, t


@lru_cache(maxsize=None)
def rotation(d: int, seed: int = SEED) -> np.ndarray:
    """A Haar-random orthogonal (d, d) matrix Pi, float64, seeded: QR of a Gaussian matrix, columns signed by R."""
    rng = np.random.default_rng([seed, d, 1])
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    q = q * np.sign(np.diag(r))[None, :]
    q.setflags(write=False)
    return q


@lru_cache(maxsize=None)
def qjl_matrix(d: int, seed: int = SEED) -> np.ndarray:
    """S (d, d), i.i.d. N(0, 1), seeded: TurboQuant_prod's residual sketch."""
    s = np.random.default_rng([seed, d, 2]).standard_normal((d, d))
    s.setflags(write=False)
    return s


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float16).astype(np.float64)


def quantize_mse_unit(u: np.ndarray, bits: int, rot: np.ndarray) -> np.ndarray:
    """TurboQuant_mse of unit vectors u (..., d): rotate, nearest Lloyd-Max level per coordinate, rotate back."""
    d = u.shape[-1]
    levels, thr = lloyd_max(bits)
    y = u @ rot.T                                     # Pi u
    idx = np.searchsorted(thr / math.sqrt(d), y)      # nearest level (thresholds are the midpoints)
    return (levels[idx] / math.sqrt(d)) @ rot         # Pi^T c[idx]


def quantize(x: np.ndarray, bits: int, *, prod: bool = False, seed: int = SEED) -> np.ndarray:
    """x (..., d) through TurboQuant_mse (b bits) or TurboQuant_prod (b-1 bits + 1-bit QJL residual), with the norm
    (and gamma) stored in fp16; returns the reconstruction (float32)."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    rot = rotation(d, seed)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    u = x / np.where(norm > 0, norm, 1.0)
    if not prod:
        ut = quantize_mse_unit(u, bits, rot)
    else:
        um = quantize_mse_unit(u, bits - 1, rot)
        r = u - um
        gamma = _f16(np.linalg.norm(r, axis=-1, keepdims=True))
        s = qjl_matrix(d, seed)
        z = np.where(r @ s.T > 0, 1.0, -1.0)          # sign(S r); sign(0) taken as -1
        ut = um + math.sqrt(math.pi / 2) / d * gamma * (z @ s)
    return (_f16(norm) * ut).astype(np.float32)


class TurboQuant:
    name = "turboquant"
    paper = ("Zandieh, Daliri, Hadian, Mirrokni: TurboQuant, online vector quantization with near-optimal "
             "distortion rate (arXiv 2504.19874)")
    headline = "LongBench-E, Llama-3.1-8B-Instruct: fp16 50.06, TurboQuant 3.5 bits 50.06, 2.5 bits 49.44"
    rewrites = frozenset({"k", "v"})
    observes = frozenset({"k", "v"})

    def __init__(self, bits: int, prod: bool = False, seed: int = SEED):
        if prod and bits < 2:
            raise MethodError("turboquant: the QJL variant needs at least 2 bits ((b-1)-bit codes + 1-bit sketch)")
        self.b, self.prod, self.seed = bits, prod, seed
        self.setting = f"{bits}+qjl" if prod else f"{bits}"
        self.label = f"turboquant:{self.setting}"
        self.fingerprint: str | None = None
        self._layers: dict[int, tuple[int, int, int]] = {}

    def fit(self, calib) -> None:
        """Nothing is learnt (data-oblivious); records the layers' shapes and the fingerprint."""
        self._layers = layer_shapes(calib)
        self.fingerprint = calib.ident.fingerprint

    def begin(self, n_ctx: int) -> None:
        pass

    def apply(self, il: int, kind: str, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if kind == "k":
            return quantize(x, self.b, prod=self.prod, seed=self.seed)
        if kind == "v":
            return quantize(x, self.b, seed=self.seed)
        return x

    def bits(self, n_ctx: int) -> Bits:
        side_k = 32 if self.prod else 16
        bk, bv = row_bits(self.label, self._layers, lambda d: self.b + side_k / d, lambda d: self.b + 16 / d)
        kdesc = (f"{self.b - 1}-bit Lloyd-Max + 1-bit QJL residual + fp16 norm and gamma" if self.prod
                 else f"{self.b}-bit Lloyd-Max + fp16 norm")
        return Bits(bk, bv, f"K: {kdesc} per head vector; V: {self.b}-bit Lloyd-Max + fp16 norm")


def make(setting: str) -> TurboQuant:
    m = re.fullmatch(r"\s*(\d+)\s*(\+\s*qjl)?\s*", setting)
    if not m:
        raise MethodError(f"turboquant:{setting}: settings are b or b+qjl, b the bits per coordinate (2, 3, 4)")
    b = int(m.group(1))
    if not 1 <= b <= 8:
        raise MethodError(f"turboquant:{setting}: bits per coordinate between 1 and 8")
    return TurboQuant(b, prod=bool(m.group(2)))
