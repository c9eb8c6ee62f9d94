#!/usr/bin/env python3
"""What trellis-coded quantization costs the CPU cache: its writes (C Viterbi encoders for the lab's tcq method,
``qaq_gguf/methods/tcq.py``, and the native type ``tcq3``'s quantizer) against the scalar quantizers of the same
size, and its reads (ggml-cpu's flash-attention kernels of ``tcq3`` / ``tcq2`` against ``qaq3h`` / ``qaq2h``), each
on the same rows, interleaved in one run.

Two encoders, compiled here with ``cc -O3 -march=native -ffp-contract=off``, one walk per row:
- plain C, loops written for the auto-vectorizer, back pointers as one byte per step and predecessor group: the
  numpy Viterbi's rule (``trellis.viterbi``);
- AVX2 by hand (where the compiler targets it), the encoder a native type would use: 8 states per instruction, each
  step one pass that keeps per predecessor group the best cost with its argmin in the cost's low bits, so one
  integer min does compare and select (``trellis.viterbi(..., tagged=True)``, the same rule in numpy).
Each encoder's walks are checked equal to numpy's before anything is timed. The scalar side is ggml-cpu's own
``quantize_row_qaq3h`` / ``quantize_row_qaq3l`` (the vectorized from_float SET_ROWS calls) and ``quantize_row_qaq3``
(the 3.5-bit type issue 24's speed goal names), beside the native cache type ``tcq3``'s own (``quantize_row_tcq3``:
the scale, one walk, AVX-512 or AVX2 as the build targets, the packing). Each row carries its ratio to the scalar
type of its size (``x_scalar``) and to ``qaq3`` (``x_qaq3``).

Reads: per row of 64 values, the K.q product with three q8_0 query rows at once (``ggml_cpu_vec_dot_rows``: the
query heads of one KV head in SmolLM2's decode) and the row conversion to f32 for V (``ggml_cpu_dequantize_row``),
each over all rows in one call. Writes ``tcq-encode.json`` and ``tcq-decode.json``.

  python3 tools/tcq_cost.py -o docs/results/code-smoke
"""
from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    from qaq_gguf import ggml_ctypes
    from qaq_gguf import trellis
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from qaq_gguf import ggml_ctypes
    from qaq_gguf import trellis

C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

// the least squared error walk of each row (from state 0) through a bit-shift trellis of 2^L states, k bits per
// step: states s_t = ((s_{t-1} << k) | b_t) mod 2^L, value table[s_t]; writes each step's state (L <= 16)
void tcq_encode(const float * x, int64_t n_rows, int d, const float * table, int L, int k, uint16_t * states,
                float * work, uint8_t * bp) {
    const int S = 1 << L, K = 1 << k, H = S >> k;
    float * cost = work, * next = work + S, * m = work + 2*S;
    uint8_t * arg = bp;
    for (int64_t r = 0; r < n_rows; ++r) {
        const float * xr = x + r*d;
        for (int s = 0; s < S; ++s) cost[s] = INFINITY;
        cost[0] = 0.0f;
        for (int t = 0; t < d; ++t) {
            uint8_t * a = arg + (size_t) t*H;
            for (int lo = 0; lo < H; ++lo) { m[lo] = cost[lo]; a[lo] = 0; }
            for (int top = 1; top < K; ++top) {
                const float * c = cost + top*H;
                for (int lo = 0; lo < H; ++lo) {
                    const int better = c[lo] < m[lo];
                    m[lo] = better ? c[lo] : m[lo];
                    a[lo] = better ? (uint8_t) top : a[lo];
                }
            }
            const float v = xr[t];
            for (int s = 0; s < S; ++s) {
                const float e = v - table[s];
                next[s] = m[s >> k] + e*e;
            }
            float * tmp = cost; cost = next; next = tmp;
        }
        int best = 0;
        for (int s = 1; s < S; ++s) if (cost[s] < cost[best]) best = s;
        uint16_t * out = states + r*d;
        for (int t = d - 1; t >= 0; --t) {
            out[t] = (uint16_t) best;
            const int lo = best >> k;
            best = arg[(size_t) t*H + lo] * H + lo;
        }
    }
}

#if defined(__AVX2__)
#include <immintrin.h>
// the encoder a native type would use, for AVX2 (8 states per instruction), one pass per step. Each step keeps
// M[lo], the cost of the best walk into the K states top*H + lo, with that best top in the cost's low k bits: as
// the costs are floats >= 0, their bits order as int32, and one integer min picks the cost and its argmin at once
// (numpy's trellis.viterbi(..., tagged=True) is the same rule, step by step). mul and add stay separate (built with
// -ffp-contract=off) so the costs round as numpy's do. bp holds d*H bytes.
static inline __attribute__((always_inline)) void tcq_walk_avx2(const float * xr, int d, const float * table,
        const int L, const int k, uint16_t * out, uint8_t * bp) {
    const int S = 1 << L, K = 1 << k, H = S >> k;
    float Ma[H], Mb[H];
    float * Mp = Ma, * Mn = Mb;
    for (int lo = 0; lo < H; ++lo) Mp[lo] = 1e30f;  // unreachable: walks start in state 0
    Mp[0] = 0.0f;
    const __m256i clear = _mm256_set1_epi32(~(K - 1));
    for (int t = 0; t < d - 1; ++t) {
        const __m256 v = _mm256_set1_ps(xr[t]);
        for (int lo = 0; lo < H; lo += 8) {
            __m256i best = _mm256_set1_epi32(0x7fffffff);
            for (int top = 0; top < K; ++top) {
                const int s = top*H + lo;  // states s .. s+7 come from M[s >> k ..]
                const __m256 ms = k == 3 ? _mm256_broadcast_ss(Mp + (s >> 3))
                                         : _mm256_set_m128(_mm_broadcast_ss(Mp + (s >> 2) + 1),
                                                           _mm_broadcast_ss(Mp + (s >> 2)));
                const __m256 e = _mm256_sub_ps(v, _mm256_loadu_ps(table + s));
                const __m256i c = _mm256_castps_si256(_mm256_add_ps(ms, _mm256_mul_ps(e, e)));
                best = _mm256_min_epi32(best, _mm256_or_si256(_mm256_and_si256(c, clear), _mm256_set1_epi32(top)));
            }
            _mm256_storeu_si256((__m256i *) (Mn + lo), best);
            const __m256i ai = _mm256_and_si256(best, _mm256_set1_epi32(K - 1));
            const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(ai), _mm256_extracti128_si256(ai, 1));
            _mm_storel_epi64((__m128i *) (bp + (size_t) (t + 1)*H + lo), _mm_packus_epi16(w, w));
        }
        float * tmp = Mp; Mp = Mn; Mn = tmp;
    }
    // the last step: every state's cost, the first of the least
    const float xl = xr[d - 1];
    int best = 0;
    float bc = INFINITY;
    for (int s = 0; s < S; ++s) {
        const float e = xl - table[s];
        const float c = Mp[s >> k] + e*e;
        if (c < bc) { bc = c; best = s; }
    }
    for (int t = d - 1; t >= 0; --t) {
        out[t] = (uint16_t) best;
        if (t == 0) break;
        const int lo = best >> k;
        best = bp[(size_t) t*H + lo]*H + lo;
    }
}

int tcq_encode_avx2(const float * x, int64_t n_rows, int d, const float * table, int L, int k, uint16_t * states,
                    float * unused, uint8_t * bp) {
    (void) unused;
    for (int64_t r = 0; r < n_rows; ++r) {  // the trellis sizes as constants: the loops unroll
        const float * xr = x + r*d;
        uint16_t * out = states + r*d;
        if (k == 3 && L == 8) tcq_walk_avx2(xr, d, table, 8, 3, out, bp);
        else if (k == 3 && L == 6) tcq_walk_avx2(xr, d, table, 6, 3, out, bp);
        else if (k == 3 && L == 10) tcq_walk_avx2(xr, d, table, 10, 3, out, bp);
        else if (k == 2 && L == 8) tcq_walk_avx2(xr, d, table, 8, 2, out, bp);
        else if (k == 2 && L == 6) tcq_walk_avx2(xr, d, table, 6, 2, out, bp);
        else return 1;
    }
    return 0;
}
#endif
"""


def build_encoder(workdir: Path) -> ctypes.CDLL:
    src = workdir / "tcq_encode.c"
    so = workdir / "tcq_encode.so"
    src.write_text(C_SOURCE)
    subprocess.run(["cc", "-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(so), str(src)],
                   check=True)
    lib = ctypes.CDLL(str(so))
    P = ctypes.c_void_p
    lib.tcq_encode.argtypes = [P, ctypes.c_int64, ctypes.c_int, P, ctypes.c_int, ctypes.c_int, P, P, P]
    lib.tcq_encode.restype = None
    if hasattr(lib, "tcq_encode_avx2"):
        lib.tcq_encode_avx2.argtypes = lib.tcq_encode.argtypes
        lib.tcq_encode_avx2.restype = ctypes.c_int
    return lib


def encoder(lib, n: int, d: int, table: np.ndarray, k: int, avx2: bool = False):
    """A function of x (n, d) float32 that writes the walks into its own buffers and returns them (uint16): the
    buffers are made once, so a timing sees the encoder alone."""
    table = np.ascontiguousarray(table, np.float32)
    L = len(table).bit_length() - 1
    states = np.empty((n, d), np.uint16)
    work = np.empty(max(3 << L, (d + 1) << (L - k)), np.float32)
    bp = np.empty(d << (L - k), np.uint8)
    fn = lib.tcq_encode_avx2 if avx2 else lib.tcq_encode

    def run(x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape == (n, d)
        if fn(x.ctypes.data, n, d, table.ctypes.data, L, k, states.ctypes.data, work.ctypes.data, bp.ctypes.data):
            raise ValueError(f"the AVX2 encoder is built for (k, L) = (3, 6|8|10), (2, 6|8), not ({k}, {L})")
        return states
    return run


def encode(lib, x: np.ndarray, table: np.ndarray, k: int, avx2: bool = False) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    return encoder(lib, *x.shape, table, k, avx2)(x).astype(np.int64)


def check(lib, k: int, L: int, d: int, avx2: bool = False) -> int:
    """How many of 64 Gaussian rows the C encoder walks differently from the numpy Viterbi of the same rule (plain or
    tagged costs; 0: the same walks, the same float32 costs, the same ties)."""
    table, rho = trellis.codebook(k, L)
    x = (np.random.default_rng(1).standard_normal((64, d)) * rho).astype(np.float32)
    return int(np.sum(np.any(encode(lib, x, table, k, avx2) != trellis.viterbi(x, table, k, tagged=avx2), axis=1)))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096, help="rows per timing (default 4096)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; a cell is the median (default 5)")
    ap.add_argument("--state-bits", default="6,8,10", help="trellis sizes L to time (default 6,8,10)")
    ap.add_argument("-o", "--output-dir", type=Path, default=Path("."))
    args = ap.parse_args(argv)
    _, cpu = ggml_ctypes.load()
    scalar = {64: "qaq3h", 256: "qaq3l"}  # today's 3-bit types at Smol's and Gemma's head sizes
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_encoder(Path(tmp))
        avx2_ok = hasattr(lib, "tcq_encode_avx2")
        rows = []
        for d, tname in scalar.items():
            x = np.random.default_rng(d).standard_normal((args.rows, d)).astype(np.float32)
            q = getattr(cpu, f"quantize_row_{tname}")
            q.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            out = np.empty(x.size, np.uint8)  # more than the quantized rows need
            q3 = cpu.quantize_row_qaq3
            q3.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            configs = {tname: lambda: q(x.ctypes.data, out.ctypes.data, x.size),
                       "qaq3": lambda: q3(x.ctypes.data, out.ctypes.data, x.size)}
            native = cpu.quantize_row_tcq3  # the cache type tcq3 (patches/0032): scale, one walk, packing
            native.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            configs["tcq3 (ggml-cpu)"] = lambda: native(x.ctypes.data, out.ctypes.data, x.size)
            for L in (int(v) for v in args.state_bits.split(",")):
                table, rho = trellis.codebook(3, L)
                xs = np.ascontiguousarray(x * rho, np.float32)
                for avx2 in (False, True) if avx2_ok else (False,):
                    bad = check(lib, 3, L, d, avx2)
                    if bad:
                        raise SystemExit(f"the C Viterbi{' (AVX2)' if avx2 else ''} walks {bad} of 64 rows unlike "
                                         f"numpy's (L={L}, d={d})")
                    enc = encoder(lib, len(xs), d, table, 3, avx2)
                    configs[f"tcq:3/L{L}" + (" avx2" if avx2 else "")] = (lambda enc=enc, xs=xs: enc(xs))
            times: dict[str, list[float]] = {c: [] for c in configs}
            for _ in range(args.rounds):
                for c, fn in configs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[c].append((time.perf_counter() - t0) / args.rows)
            base = 1e6 * statistics.median(times[tname])
            base3 = 1e6 * statistics.median(times["qaq3"])
            for c, ts in times.items():
                us = 1e6 * statistics.median(ts)
                rows.append({"head_dim": d, "config": c, "us_per_row": us, "x_scalar": us / base,
                             "x_qaq3": us / base3})
                print(f"d={d:<4} {c:<16} {us:9.2f} us/row  {us / base:8.2f}x {tname}  {us / base3:8.2f}x qaq3")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    command = "python3 tools/tcq_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"command": command, "machine": cpu_name(), "rows": args.rows, "rounds": args.rounds, "results": rows}
    (args.output_dir / "tcq-encode.json").write_text(json.dumps(out, indent=1))
    out = {"command": command, "machine": cpu_name(), "rows": args.rows, "rounds": args.rounds,
           "results": decode_costs(cpu, args.rows, args.rounds)}
    (args.output_dir / "tcq-decode.json").write_text(json.dumps(out, indent=1))
    return 0


def decode_costs(cpu, n_rows: int, rounds: int) -> list[dict]:
    """ns per row of 64 values: K.q with 3 query rows (the rows form of vec_dot) and V's conversion to f32, for the
    trellis types and the scalar ones of the same size, interleaved; medians of the rounds."""
    import gguf

    from qaq_gguf import cachetypes, quants

    rng = np.random.default_rng(7)
    n = 64 * n_rows  # every row in one call: one long row for the kernels
    k = rng.standard_normal(n).astype(np.float32)
    q = gguf.quants.quantize(rng.standard_normal((3, n)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    s = np.zeros(3, np.float32)
    y = np.zeros(n, np.float32)
    calls = {}
    for name in ("qaq3h", "tcq3", "qaq2h", "tcq2"):
        tid = cachetypes.get(name).type_id
        raw = quants.quantize(k, name)
        dot = ggml_ctypes.ROWS_FN(cpu.ggml_cpu_vec_dot_rows(tid))
        calls[(name, "K.q, 3 query rows")] = (lambda dot=dot, raw=raw: dot(n, s.ctypes.data, raw.ctypes.data,
                                                                             q.ctypes.data, q.shape[1], 3))
        calls[(name, "V row to f32")] = (lambda tid=tid, raw=raw: cpu.ggml_cpu_dequantize_row(
            tid, raw.ctypes.data, y.ctypes.data, n))
    times: dict = {c: [] for c in calls}
    for _ in range(rounds):
        for c, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[c].append((time.perf_counter() - t0) / n_rows)
    out = []
    for (name, op), ts in times.items():
        ns = 1e9 * statistics.median(ts)
        base = 1e9 * statistics.median(times[({"tcq3": "qaq3h", "tcq2": "qaq2h"}.get(name, name), op)])
        out.append({"type": name, "op": op, "ns_per_row": ns, "x_scalar": ns / base})
        print(f"{name:<6} {op:<20} {ns:8.1f} ns/row  {ns / base:5.2f}x")
    return out


if __name__ == "__main__":
    sys.exit(main())
