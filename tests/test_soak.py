"""llama-server with a mixed profile under load for about a minute (tools/soak_server.py; the 30-minute run is the
tool's): parallel slots with continuous batching, mixed prompt lengths, sampled and greedy requests, slot save and
restore, generations that shift the context. No errors, and a single-slot server's greedy answer never changes."""
from __future__ import annotations

import sys
from pathlib import Path

from qaq_gguf import profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import soak_server  # noqa: E402


def test_server_holds_load_with_a_mixed_profile(gemma, gemma_ident, tmp_path):
    n = gemma_ident.n_layer
    p = profile.make_profile(gemma_ident, ["q8_0" if il % 2 else "qaq3" for il in range(n)],
                             ["q4_0" if il % 3 else "qaq2" for il in range(n)])
    f = profile.write_profile(p, tmp_path / "mixed.gguf")
    res = soak_server.run(gemma, str(f), minutes=0.75, clients=4, parallel=4, n_ctx=256, out=tmp_path / "soak")
    assert res["n_errors"] == 0, res["errors"]
    assert res["requests"] >= 8, res
    assert res["saves"] >= 1 or res["requests"] < 20, res
    assert res["greedy_checks"] >= 1 and res["greedy_mismatch"] == 0, res
    assert res["shifted"] >= 1, res
