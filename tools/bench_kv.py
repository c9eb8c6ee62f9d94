#!/usr/bin/env python3
"""KV-cache speed benchmark: llama-bench prefill and decode for several cache configs, side by side in one run.

Each config is a K/V type pair (``q8_0/qaq2``) or a qaq-gguf profile (a path ending in .gguf); all run with flash
attention on, through our llama-bench (``-ctk/-ctv`` or ``--kv-profile``). For every config the script records
prefill (pp N) and decode (tg N at each depth), the KV bytes one decoded token reads at that depth, and the bytes
per second decode achieves (KV plus weights). Writes ``bench.json``, ``bench.md`` and ``bench.png`` into -o.

  # H100, synthetic Llama-3.1-8B shape (tools/synth_gguf.py):
  python3 tools/bench_kv.py /tmp/llama3-8b-q4_0.gguf -ngl 99 --depths 0,8192,32768 -p 2048 -n 64 \\
      --configs f16/f16,q8_0/q8_0,q4_0/q4_0,qaq3/qaq3,qaq2/qaq2,q8_0/qaq2 -o docs/results/bench-h100
  # CPU, Gemma 3 270M at depth 4k on 2 threads:
  python3 tools/bench_kv.py --depths 4096 -p 512 -n 32 -t 2 --configs f16/f16,q4_0/q4_0,qaq3/qaq3,qaq2/qaq2 \\
      -o docs/results/bench-cpu

Configs run interleaved: -r rounds, each config once per round (the order rotated each round) after an untimed
warm-up, and each cell is the median over the rounds. Numbers from one run are comparable with each other; compare
across runs only on the same machine and build.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    from qaq_gguf import _native, models, profile
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from qaq_gguf import _native, models, profile


def config_profile(config: str, ident: profile.ModelIdentity) -> profile.Profile:
    """A config as a profile: the file itself, or one type pair for every layer."""
    if config.endswith(".gguf"):
        return profile.read_profile(config)
    k, v = config.split("/")
    return profile.make_profile(ident, k, v)


def kv_bytes_at(config: str, depth: int, ident: profile.ModelIdentity) -> int:
    """Bytes of the K and V cache at this depth (sliding-window layers hold only their window), which is what one
    decoded token's attention reads."""
    return profile.kv_bytes(config_profile(config, ident), max(depth, 1)) if depth else 0


def run_llama_bench(model: Path, config: str, a, *, n_prompt: int | None = None, n_gen: int | None = None,
                    depths: str | None = None) -> list[dict]:
    """One llama-bench run of one config, one repetition of each test."""
    n_prompt = a.n_prompt if n_prompt is None else n_prompt
    n_gen = a.n_gen if n_gen is None else n_gen
    cmd = [str(_native.bin_dir() / "llama-bench"), "-m", str(model), "-fa", "1", "-o", "json",
           "-p", str(n_prompt), "-n", str(n_gen), "-d", depths or a.depths, "-r", "1", "-ngl", str(a.ngl)]
    if a.threads:
        cmd += ["-t", str(a.threads)]
    if a.ubatch:
        cmd += ["-ub", str(a.ubatch)]
    if config.endswith(".gguf"):
        cmd += ["--kv-profile", config]
    else:
        k, v = config.split("/")
        cmd += ["-ctk", k, "-ctv", v]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed for {config} (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def label(config: str) -> str:
    return Path(config).name if config.endswith(".gguf") else config


def render(result: dict, peak_gbps: float = 0) -> str:
    """The markdown table of a bench.json."""
    rows = result["rows"]
    first = label(rows[0]["config"])
    lines = [f"| config | test | depth | tokens/s | × {first} | KV GB/s | KV+weights GB/s"
             + (" | % of peak |" if peak_gbps else " |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---:" + (" | ---: |" if peak_gbps else " |")]
    for r in rows:
        kv = f"{r['kv_gbps']:.2f}" if "kv_gbps" in r else ""
        tot = f"{r['total_gbps']:.1f}" if "total_gbps" in r else ""
        peak = (f" | {100 * r['total_gbps'] / peak_gbps:.0f}%" if "total_gbps" in r else " | ") if peak_gbps else ""
        lines.append(f"| {label(r['config'])} | {r['test']}{r['n']} | {r['depth']} | {r['tokens_per_s']:.1f} "
                     f"± {r['stddev']:.1f} | {r['x_first']:.2f} | {kv} | {tot}{peak} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    for c in configs:
        tg = sorted((r["depth"], r["tokens_per_s"]) for r in rows if r["config"] == c and r["test"] == "tg")
        if tg:
            ax1.plot([d for d, _ in tg], [t for _, t in tg], marker="o", label=label(c))
    ax1.set_xlabel("depth (tokens already in the cache)")
    ax1.set_ylabel("decode tokens/s")
    ax1.set_title("decode")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    d0 = min(r["depth"] for r in rows)
    pp = [(c, next((r["tokens_per_s"] for r in rows if r["config"] == c and r["test"] == "pp" and r["depth"] == d0),
                   None)) for c in configs]
    pp = [(c, t) for c, t in pp if t]
    ax2.barh([label(c) for c, _ in pp], [t for _, t in pp])
    ax2.set_xlabel(f"prefill tokens/s (depth {d0})")
    ax2.set_title("prefill")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, help="GGUF model (default: the bundled Gemma 3 270M)")
    ap.add_argument("--configs", default="f16/f16,q8_0/q8_0,q4_0/q4_0,qaq3/qaq3,qaq2/qaq2",
                    help="comma-separated K/V pairs and/or profile files (.gguf)")
    ap.add_argument("--depths", default="0,8192,32768", help="decode depths (llama-bench -d)")
    ap.add_argument("-p", "--n-prompt", type=int, default=2048)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-r", "--reps", type=int, default=3,
                    help="rounds: each config runs once per round (llama-bench -r 1) in a rotated order; a cell is "
                         "the median over rounds (default 3)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the untimed short run of the first config before round 1")
    ap.add_argument("-ngl", type=int, default=99)
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("-ub", "--ubatch", type=int, default=0)
    ap.add_argument("--peak-gbps", type=float, default=0, help="device memory bandwidth, GB/s, for the %% of peak column")
    ap.add_argument("-o", "--output-dir", type=Path, required=True)
    ap.add_argument("--render", action="store_true", help="only re-render bench.md and bench.png from bench.json")
    a = ap.parse_args(argv)
    if a.render:
        result = json.loads((a.output_dir / "bench.json").read_text())
        table = render(result, a.peak_gbps)
        (a.output_dir / "bench.md").write_text(table)
        print(table, end="")
        plot(result["rows"], a.output_dir / "bench.png", Path(result["model"]).name)
        return 0

    model = a.model or models.gemma3_270m()
    ident = profile.model_identity(model)
    weights = model.stat().st_size
    a.output_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    started = time.time()
    info = {}
    configs = a.configs.split(",")
    if a.warmup:  # untimed: the model's pages, the allocator and the clocks settle before the first timed config
        run_llama_bench(model, configs[0], a, n_prompt=64, n_gen=8, depths="0")
    samples: dict[tuple, list[float]] = {}
    for r in range(a.reps):
        # every config once per round, the order rotated by one each round: drift and a slow neighbour on a shared
        # machine hit every config alike instead of whichever ran at that moment
        for config in configs[r % len(configs):] + configs[:r % len(configs)]:
            print(f"round {r + 1}/{a.reps}: {label(config)}", file=sys.stderr, flush=True)
            for t in run_llama_bench(model, config, a):
                key = (config, "pp" if t["n_prompt"] > 0 else "tg", t["n_prompt"] or t["n_gen"], int(t["n_depth"]))
                samples.setdefault(key, []).append(t["avg_ts"])
                info = {k: t.get(k) for k in ("cpu_info", "gpu_info", "backends", "build_commit", "n_threads")}
    order = {c: i for i, c in enumerate(configs)}
    for (config, test, n, depth), ts in sorted(samples.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] == "tg", kv[0][3])):
        med = statistics.median(ts)
        row = {"config": config, "test": test, "n": n, "depth": depth, "tokens_per_s": med,
               "stddev": statistics.stdev(ts) if len(ts) > 1 else 0.0, "rounds": ts}
        if test == "tg":
            kv = kv_bytes_at(config, depth, ident)
            row["kv_bytes_per_token"] = kv
            row["kv_gbps"] = kv * med / 1e9
            row["total_gbps"] = (kv + weights) * med / 1e9
        rows.append(row)

    # × the first config: the median over rounds of the ratio within a round (the two ran minutes apart at most)
    ref = {(r["test"], r["depth"]): r["rounds"] for r in rows if r["config"] == configs[0]}
    for r in rows:
        base = ref.get((r["test"], r["depth"]))
        r["x_first"] = statistics.median(t / b for t, b in zip(r["rounds"], base)) if base else None
    result = {"command": "python3 tools/bench_kv.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": str(model), "n_layer": ident.n_layer, "n_head_kv": max(ident.n_head_kv),
              "weights_bytes": weights, "machine": platform.node(), "seconds": round(time.time() - started, 1),
              **info, "rows": rows}
    (a.output_dir / "bench.json").write_text(json.dumps(result, indent=1))

    table = render(result, a.peak_gbps)
    (a.output_dir / "bench.md").write_text(table)
    print(table, end="")
    try:
        plot(rows, a.output_dir / "bench.png", f"{model.name} · {info.get('gpu_info') or info.get('cpu_info')}")
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
