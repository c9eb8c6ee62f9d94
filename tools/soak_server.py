#!/usr/bin/env python3
"""llama-server with a mixed KV profile under load: many clients for a fixed time, and what held.

    python3 tools/soak_server.py --kv-profile qaq.gguf --minutes 30 -o docs/results/soak      # the long run
    python3 tools/soak_server.py --minutes 1 -o /tmp/soak                                      # a short check

The bundled llama-server runs the model with --kv-profile, --parallel 8 and continuous batching; --clients threads
on 127.0.0.1 send requests with mixed prompt lengths (a few tokens to most of a slot), half sampled and half greedy,
some long enough to shift the context past the slot's n_ctx (--context-shift). One client saves and restores a
slot's cache (/slots?action=save|restore) with the profile. Recorded: requests served, errors (HTTP, timeouts,
empty answers), the server's RSS every 10 s, and whether a second, single-slot server answers one fixed prompt
greedily with the same text throughout the run. Writes soak.json and soak.md (and soak.png with matplotlib).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the cache stores every layer of the model keys and values in its own type so that long context costs "
         "less memory while the answers stay the same as with the full precision cache on this machine").split()


def prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def run(model: Path, profile: str | None, *, minutes: float, clients: int, parallel: int, n_ctx: int,
        out: Path, cache_ram: int = 0, threads: int = 1) -> dict:
    from qaq_gguf.server import Server

    out.mkdir(parents=True, exist_ok=True)
    prof = ["--kv-profile", profile] if profile else []
    slots = out / "slots"
    slots.mkdir(exist_ok=True)
    main = Server(["-m", str(model), *prof, "--parallel", str(parallel), "-c", str(n_ctx * parallel), "-cb",
                               "--context-shift", "--slot-save-path", str(slots), "-t", str(threads), "--no-warmup",
                  "--cache-ram", str(cache_ram)],
                  out / "server.log")
    ref = Server(["-m", str(model), *prof, "--parallel", "1", "-c", "2048", "-t", "1", "--no-warmup"], out / "ref.log")
    stats = {"requests": 0, "errors": [], "shifted": 0, "saves": 0, "restores": 0, "greedy_mismatch": 0,
             "greedy_checks": 0}
    lock = threading.Lock()
    stop_at = time.time() + 60 * minutes
    rss: list[tuple[float, float]] = []
    fixed = "Write one sentence about a river:"
    try:
        main.wait_ready()
        ref.wait_ready()
        greedy0 = ref.post("/completion", {"prompt": fixed, "n_predict": 24, "temperature": 0, "cache_prompt": False})
        expect = greedy0["content"]

        def client(i: int) -> None:
            rng = random.Random(i)
            while time.time() < stop_at:
                # prompts fit the slot (the server rejects longer ones with 400); answers grow past it to shift
                n_words = rng.choice((4, n_ctx // 8, n_ctx // 2, n_ctx * 7 // 10))
                shift = rng.random() < 0.1
                body = {"prompt": prompt(rng, n_words), "n_predict": n_ctx if shift else rng.choice((8, 32, 64)),
                        "temperature": 0 if rng.random() < 0.5 else 0.8, "seed": rng.randrange(1 << 30),
                        "cache_prompt": rng.random() < 0.5}
                try:
                    r = main.post("/completion", body)
                    ok = isinstance(r.get("content"), str) and r.get("tokens_predicted", 0) > 0
                    with lock:
                        stats["requests"] += 1
                        # a context shift happened when prompt plus answer outgrew the slot
                        stats["shifted"] += r.get("tokens_evaluated", 0) + r.get("tokens_predicted", 0) > n_ctx
                        if not ok:
                            stats["errors"].append(f"client {i}: empty answer")
                    if i == 0 and rng.random() < 0.2:
                        fn = f"slot-{i}-{stats['requests']}.bin"
                        main.post("/slots/0?action=save", {"filename": fn})
                        main.post("/slots/0?action=restore", {"filename": fn})
                        with lock:
                            stats["saves"] += 1
                            stats["restores"] += 1
                        (slots / fn).unlink(missing_ok=True)
                except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
                    with lock:
                        stats["errors"].append(f"client {i}: {type(e).__name__}: {e}")

        def greedy_checker() -> None:
            while time.time() < stop_at:
                time.sleep(15)
                try:
                    r = ref.post("/completion", {"prompt": fixed, "n_predict": 24, "temperature": 0,
                                                 "cache_prompt": False})
                    with lock:
                        stats["greedy_checks"] += 1
                        stats["greedy_mismatch"] += r["content"] != expect
                except (urllib.error.URLError, OSError) as e:
                    with lock:
                        stats["errors"].append(f"greedy check: {e}")

        workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        workers.append(threading.Thread(target=greedy_checker, daemon=True))
        t0 = time.time()
        for t in workers:
            t.start()
        while any(t.is_alive() for t in workers):
            rss.append((round(time.time() - t0, 1), main.rss_mib()))
            if main.proc.poll() is not None:
                stats["errors"].append(f"llama-server exited with {main.proc.returncode}")
                break
            time.sleep(10 if minutes > 2 else 2)
        for t in workers:
            t.join(timeout=600)
    finally:
        main.stop()
        ref.stop()
    warm = [m for s, m in rss if s > 0.2 * 60 * minutes]
    res = {"model": str(model), "profile": profile, "minutes": minutes, "clients": clients, "parallel": parallel,
           "n_ctx_per_slot": n_ctx, "cache_ram_mib": cache_ram, "threads": threads,
           **{k: v for k, v in stats.items() if k != "errors"},
           "n_errors": len(stats["errors"]), "errors": stats["errors"][:50], "rss_mib": rss,
           "rss_growth_after_warmup_mib": (max(warm) - min(warm)) if warm else 0.0, "greedy_reference": expect}
    (out / "soak.json").write_text(json.dumps(res, indent=1))
    md = [f"llama-server --parallel {parallel} -cb --context-shift --cache-ram {cache_ram} -t {threads}, {clients} "
          f"clients, {minutes:g} min, profile {profile or '(none)'}", "", "| requests | errors | context shifts | slot save/restore | greedy checks "
          "(mismatches) | RSS start → end (MiB) | RSS growth after warm-up (MiB) |", "| ---: | ---: | ---: | ---: | ---: | --- | ---: |",
          f"| {res['requests']} | {res['n_errors']} | {res['shifted']} | {res['saves']} | {res['greedy_checks']} "
          f"({res['greedy_mismatch']}) | {rss[0][1]:.0f} → {rss[-1][1]:.0f} | {res['rss_growth_after_warmup_mib']:.1f} |"
          if rss else "| - |"]
    (out / "soak.md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([s / 60 for s, _ in rss], [m for _, m in rss])
        ax.set_xlabel("minutes")
        ax.set_ylabel("llama-server RSS (MiB)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "soak.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF model (default: the bundled Gemma 3 270M)")
    ap.add_argument("--kv-profile", help="profile the servers use (default: none)")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("-c", "--ctx-size", type=int, default=1024, help="context per slot (default 1024)")
    ap.add_argument("-cram", "--cache-ram", type=int, default=0,
                    help="llama-server's prompt cache in MiB (default 0: off). Upstream keeps idle slots' prompts in "
                         "RAM up to 8192 MiB by default, which grows RSS by design; off, any growth is a leak")
    ap.add_argument("-t", "--threads", type=int, default=1, help="threads of the loaded server (default 1)")
    ap.add_argument("-o", "--output-dir", type=Path, required=True)
    a = ap.parse_args()
    import qaq_gguf  # noqa: F401
    from qaq_gguf import models

    model = Path(a.model) if a.model else models.gemma3_270m()
    res = run(model, a.kv_profile, minutes=a.minutes, clients=a.clients, parallel=a.parallel, n_ctx=a.ctx_size,
              out=a.output_dir, cache_ram=a.cache_ram, threads=a.threads)
    print((a.output_dir / "soak.md").read_text())
    for e in res["errors"][:10]:
        print("error:", e)
    return 0 if res["n_errors"] == 0 and res["greedy_mismatch"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
