#!/usr/bin/env python3
"""What trellis-coded quantization would cost a cache write on the CPU: a plain C Viterbi encoder (the lab's tcq
method, ``qaq_gguf/methods/tcq.py``) against the native scalar quantizers the cache writes with today, on the same
rows, interleaved in one run.

The C encoder is compiled here with ``cc -O3 -march=native`` (one row at a time, loops written for the
auto-vectorizer, the walk stored as one byte per value); its walks are checked against the numpy Viterbi's (same
squared error) before anything is timed. The scalar side is ggml-cpu's own ``quantize_row_qaq3h`` /
``quantize_row_qaq3l`` (the vectorized from_float SET_ROWS calls). Writes ``tcq-encode.json``.

  python3 tools/tcq_encode_cost.py -o docs/results/code-smoke
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
    from qaq_gguf.methods import tcq
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from qaq_gguf import ggml_ctypes
    from qaq_gguf.methods import tcq

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
"""


def build_encoder(workdir: Path) -> ctypes.CDLL:
    src = workdir / "tcq_encode.c"
    so = workdir / "tcq_encode.so"
    src.write_text(C_SOURCE)
    subprocess.run(["cc", "-O3", "-march=native", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    lib = ctypes.CDLL(str(so))
    P = ctypes.c_void_p
    lib.tcq_encode.argtypes = [P, ctypes.c_int64, ctypes.c_int, P, ctypes.c_int, ctypes.c_int, P, P, P]
    lib.tcq_encode.restype = None
    return lib


def encode(lib, x: np.ndarray, table: np.ndarray, k: int) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    table = np.ascontiguousarray(table, np.float32)
    n, d = x.shape
    L = len(table).bit_length() - 1
    states = np.empty((n, d), np.uint16)
    work = np.empty(3 << L, np.float32)
    bp = np.empty(d << (L - k), np.uint8)
    lib.tcq_encode(x.ctypes.data, n, d, table.ctypes.data, L, k, states.ctypes.data, work.ctypes.data,
                   bp.ctypes.data)
    return states.astype(np.int64)


def check(lib, k: int, L: int, d: int) -> float:
    """The C walks' squared error against the numpy Viterbi's on Gaussian rows: the largest relative difference."""
    table, rho = tcq.codebook(k, L)
    x = (np.random.default_rng(1).standard_normal((64, d)) * rho).astype(np.float32)
    ec = np.sum((table[encode(lib, x, table, k)] - x) ** 2, axis=1)
    en = np.sum((table[tcq.viterbi(x, table, k)] - x) ** 2, axis=1)
    return float(np.max(np.abs(ec - en) / en))


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
        rows = []
        for d, tname in scalar.items():
            x = np.random.default_rng(d).standard_normal((args.rows, d)).astype(np.float32)
            q = getattr(cpu, f"quantize_row_{tname}")
            q.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            out = np.empty(x.size, np.uint8)  # more than the quantized rows need
            configs = {tname: lambda: q(x.ctypes.data, out.ctypes.data, x.size)}
            for L in (int(v) for v in args.state_bits.split(",")):
                table, rho = tcq.codebook(3, L)
                err = check(lib, 3, L, d)
                if err > 1e-4:
                    raise SystemExit(f"the C Viterbi's walks differ from numpy's (L={L}, d={d}): {err}")
                xs = x * rho
                configs[f"tcq:3/L{L}"] = (lambda xs=xs, table=table: encode(lib, xs, table, 3))
            times: dict[str, list[float]] = {c: [] for c in configs}
            for _ in range(args.rounds):
                for c, fn in configs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[c].append((time.perf_counter() - t0) / args.rows)
            base = statistics.median(times[tname])
            for c, ts in times.items():
                us = 1e6 * statistics.median(ts)
                rows.append({"head_dim": d, "config": c, "us_per_row": us, "x_scalar": us / (1e6 * base)})
                print(f"d={d:<4} {c:<11} {us:9.2f} us/row  {us / (1e6 * base):8.1f}x {tname}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = {"command": "python3 tools/tcq_encode_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": platform.processor() or platform.machine(), "rows": args.rows, "rounds": args.rounds,
           "results": rows}
    (args.output_dir / "tcq-encode.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
