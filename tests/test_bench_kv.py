"""tools/bench_kv.py: configs interleaved in rounds (rotated order, untimed warm-up), cells the median over rounds,
ratios to the first config taken within each round. Runs the real llama-bench on the tiny synthetic model."""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench_kv():
    spec = importlib.util.spec_from_file_location("bench_kv", ROOT / "tools" / "bench_kv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rounds_interleave_configs_and_cells_are_medians(tiny_model, tmp_path, capsys):
    bench = _bench_kv()
    out = tmp_path / "bench"
    assert bench.main([str(tiny_model), "--configs", "f16/f16,q8_0/qaq3,q4_0/q4_0", "--depths", "0,64", "-p", "16",
                       "-n", "4", "-r", "3", "-t", "1", "-ngl", "0", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    rounds = [line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("round ")]
    # each round runs every config once, the order rotated by one each round
    assert rounds == ["f16/f16", "q8_0/qaq3", "q4_0/q4_0",
                      "q8_0/qaq3", "q4_0/q4_0", "f16/f16",
                      "q4_0/q4_0", "f16/f16", "q8_0/qaq3"]
    # the warm-up is one short untimed run of the first config, before round 1
    runs = [line for line in err.splitlines() if line.startswith("$ ")]
    assert len(runs) == 1 + 9 and "-p 64 -n 8 -d 0" in runs[0] and "-ctk f16 -ctv f16" in runs[0]
    result = json.loads((out / "bench.json").read_text())
    rows = {(r["config"], r["test"], r["depth"]): r for r in result["rows"]}
    assert len(rows) == 3 * 2 * 2  # config x (pp, tg) x depth
    for (config, test, depth), r in rows.items():
        assert len(r["rounds"]) == 3 and r["tokens_per_s"] == statistics.median(r["rounds"]) > 0
        base = rows[("f16/f16", test, depth)]["rounds"]
        assert r["x_first"] == statistics.median(t / b for t, b in zip(r["rounds"], base))
    assert all(rows[("f16/f16", t, d)]["x_first"] == 1.0 for t in ("pp", "tg") for d in (0, 64))
    assert rows[("q8_0/qaq3", "tg", 64)]["kv_bytes_per_token"] < rows[("f16/f16", "tg", 64)]["kv_bytes_per_token"]
    assert "q8_0/qaq3" in (out / "bench.md").read_text()
