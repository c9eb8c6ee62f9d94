#!/usr/bin/env python3
"""FLASH_ATTN_EXT on the CPU by itself: milliseconds per op for several K/V type pairs at one attention shape, the
configs interleaved op by op so that a shared machine's drift hits every config alike.

The op is ggml's own (the bundled libggml-cpu), fed random K/V quantized into each type; the default shape is
Gemma 3 270M's (head size 256, 4 query heads on 1 KV head). Each round computes every config `--inner` times in a
rotated order; a cell is the median over rounds of the time per op, and × first config is the median of the
within-round ratios. Decode is one query row (the split-KV vector path), prefill a batch of rows (the tiled path).
Writes ``bench-fa.json`` and ``bench-fa.md`` into -o.

  python3 tools/bench_fa.py --pairs f16/f16,q8_0/q8_0,q4_0/q4_0,qaq3/qaq3 --shapes 1x4096,1x32768,512x4096 -o out/
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    from qaq_gguf import cachetypes, ggml_ctypes, quants
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from qaq_gguf import cachetypes, ggml_ctypes, quants


def cache_bytes(g: ggml_ctypes.Graph, x: np.ndarray, type_name: str) -> np.ndarray:
    """x (rows of head_dim values) in a cache of type_name, as the bytes the op reads."""
    if type_name == "f16":
        return x.astype(np.float16)
    if type_name in quants.KVALUES:
        return quants.quantize(x, type_name)
    tid = cachetypes.get(type_name).type_id
    traits = g.base.ggml_get_type_traits(tid).contents
    flat = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    out = np.zeros((flat.shape[0], flat.shape[1] // traits.blck_size * traits.type_size), np.uint8)
    g.base.ggml_quantize_chunk(tid, flat.ctypes.data, out.ctypes.data, 0, flat.shape[0], flat.shape[1], None)
    return out


def build(g: ggml_ctypes.Graph, pair: str, d: int, n_head: int, n_head_kv: int, n_q: int, n_kv: int) -> int:
    """The FLASH_ATTN_EXT graph of one config: causal mask, scale 1/sqrt(d)."""
    tk, tv = pair.split("/")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n_head, n_q, d)).astype(np.float32)
    k = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    n_pad = -(-n_q // 64) * 64  # llama.cpp pads the mask rows
    pos_q = np.arange(n_kv - n_q, n_kv)[:, None]
    mask = np.full((n_pad, n_kv), -np.inf, np.float32)
    mask[:n_q] = np.where(np.arange(n_kv)[None, :] <= pos_q, 0.0, -np.inf)
    out = g.base.ggml_flash_attn_ext(
        g.ctx, g.tensor(ggml_ctypes.F32, (d, n_q, n_head), q),
        g.tensor(cachetypes.get(tk).type_id, (d, n_kv, n_head_kv), cache_bytes(g, k, tk)),
        g.tensor(cachetypes.get(tv).type_id, (d, n_kv, n_head_kv), cache_bytes(g, v, tv)),
        g.tensor(ggml_ctypes.F16, (n_kv, n_pad), mask.astype(np.float16)), 1.0 / np.sqrt(d), 0.0, 0.0)
    return g.graph(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="f16/f16,q8_0/q8_0,q4_0/q4_0,qaq3/qaq3,qaq2/qaq2",
                    help="comma-separated K/V type pairs; the first is the reference of the × column")
    ap.add_argument("--shapes", default="1x4096,1x16384,1x32768,512x4096",
                    help="query rows x KV cells, comma-separated (1 row: decode; 64 or more: the tiled prefill)")
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--heads", default="4/1", help="query heads / KV heads (default: Gemma 3 270M's 4/1)")
    ap.add_argument("-r", "--rounds", type=int, default=7)
    ap.add_argument("--inner", type=int, default=0, help="ops per config per round (default: 20 decode, 2 prefill)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-o", "--output-dir", type=Path, required=True)
    a = ap.parse_args(argv)
    pairs = a.pairs.split(",")
    n_head, n_head_kv = (int(x) for x in a.heads.split("/"))
    ggml = ggml_ctypes.load()
    rows, started = [], time.time()
    for shape in a.shapes.split(","):
        n_q, n_kv = (int(x) for x in shape.split("x"))
        inner = a.inner or (20 if n_q == 1 else 2)
        graphs = {}
        try:
            for p in pairs:
                n_pad = -(-n_q // 64) * 64
                mem = 8 * n_head * n_q * a.head_dim + 4 * n_head_kv * n_kv * a.head_dim + 2 * n_pad * n_kv + (4 << 20)
                g = ggml_ctypes.Graph(ggml, mem=mem)  # Q, out (f32), K, V (f16 at most), mask (f16)
                graphs[p] = (g, build(g, p, a.head_dim, n_head, n_head_kv, n_q, n_kv))
            times: dict[str, list[float]] = {p: [] for p in pairs}
            for r in range(a.rounds + 1):  # round 0 warms up
                for p in pairs[r % len(pairs):] + pairs[:r % len(pairs)]:
                    g, gf = graphs[p]
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        g.run(gf, a.threads)
                    if r:
                        times[p].append((time.perf_counter() - t0) / inner * 1e3)
        finally:
            for g, _ in graphs.values():
                g.__exit__()
        for p in pairs:
            rows.append({"pair": p, "n_q": n_q, "n_kv": n_kv, "ms": statistics.median(times[p]), "rounds": times[p],
                         "x_first": statistics.median(b / t for t, b in zip(times[p], times[pairs[0]]))})
        print(f"{n_q}x{n_kv}: " + "  ".join(f"{r['pair']} {r['ms']:.3f} ms ({r['x_first']:.2f}x)"
                                           for r in rows if (r["n_q"], r["n_kv"]) == (n_q, n_kv)),
              file=sys.stderr, flush=True)
    result = {"command": "python3 tools/bench_fa.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "head_dim": a.head_dim, "n_head": n_head, "n_head_kv": n_head_kv, "threads": a.threads,
              "machine": platform.node(), "processor": platform.processor(), "seconds": round(time.time() - started, 1),
              "rows": rows}
    a.output_dir.mkdir(parents=True, exist_ok=True)
    (a.output_dir / "bench-fa.json").write_text(json.dumps(result, indent=1))
    shapes = list(dict.fromkeys((r["n_q"], r["n_kv"]) for r in rows))
    lines = ["| pair | " + " | ".join(f"{'decode' if q == 1 else f'{q} rows'} @ {kv}: ms | ×" for q, kv in shapes) + " |",
             "| --- |" + " ---: | ---: |" * len(shapes)]
    for p in pairs:
        cells = [next(r for r in rows if r["pair"] == p and (r["n_q"], r["n_kv"]) == s) for s in shapes]
        lines.append(f"| {p} | " + " | ".join(f"{c['ms']:.3f} | {c['x_first']:.2f}" for c in cells) + " |")
    table = "\n".join(lines) + "\n"
    (a.output_dir / "bench-fa.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
