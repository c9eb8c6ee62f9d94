"""tools/bench_fa.py: FLASH_ATTN_EXT alone per K/V pair, configs interleaved op by op, cells the median over rounds
and ratios to the first pair taken within each round. Runs the real op (ggml-cpu) at small shapes."""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pairs_and_shapes_timed_side_by_side(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_fa", ROOT / "tools" / "bench_fa.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "fa"
    pairs = ["f16/f16", "qaq3/q4_0", "iq4_nl/q8_0"]
    assert bench.main(["--pairs", ",".join(pairs), "--shapes", "1x300,64x128", "--head-dim", "128", "--heads", "4/2",
                       "-r", "3", "--inner", "2", "-t", "1", "-o", str(out)]) == 0
    result = json.loads((out / "bench-fa.json").read_text())
    assert (result["head_dim"], result["n_head"], result["n_head_kv"]) == (128, 4, 2)
    rows = {(r["pair"], r["n_q"], r["n_kv"]): r for r in result["rows"]}
    assert set(rows) == {(p, q, kv) for p in pairs for q, kv in ((1, 300), (64, 128))}
    for (pair, q, kv), r in rows.items():
        assert len(r["rounds"]) == 3 and r["ms"] == statistics.median(r["rounds"]) > 0
        base = rows[("f16/f16", q, kv)]["rounds"]
        assert r["x_first"] == statistics.median(b / t for t, b in zip(r["rounds"], base))
    assert rows[("f16/f16", 1, 300)]["x_first"] == 1.0
    table = (out / "bench-fa.md").read_text()
    assert "qaq3/q4_0" in table and "decode @ 300" in table and "64 rows @ 128" in table
