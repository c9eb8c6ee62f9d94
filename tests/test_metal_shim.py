"""The Metal code of the qaq and tcq types, checked on Linux (tools/metal_shim/run.sh, docs/metal.md).

The qaq sections of the patched tree's ggml-metal kernels/dequantize.h and kernels/quantize.h are compiled as C++
through tools/metal_shim/shim.h and compared block by block with the C reference (native/ggml/ggml-qaq.c): the
quantizers' bytes and the dequantizers' floats, on generated blocks and random bytes. No Mac needed; this checks the
port's logic and bit layout, not MSL syntax or GPU floating point. The second test shows the check can fail.

Run: pytest tests/test_metal_shim.py
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cuda_compile import _tree  # the patched llama.cpp tree the package build extracted (current patches only)

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tools" / "metal_shim" / "run.sh"
TYPES = ("qaq4h", "qaq3h", "qaq2h", "tcq3", "tcq2", "qaq4l", "qaq3l", "qaq2l", "qaq3", "qaq2")


@pytest.fixture(scope="module")
def tree() -> Path:
    if shutil.which("g++") is None or shutil.which("gcc") is None:
        pytest.skip("no gcc/g++ for the Metal shim")
    t, why = _tree()
    if t is None:
        pytest.skip(why)
    return t


def _run(tree: Path, blocks: int) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(RUN), str(tree), str(blocks)], capture_output=True, text=True, timeout=600)
    print(r.stdout, r.stderr)
    return r


def _counts(out: str) -> dict[str, tuple[int, int, int]]:
    rows = re.findall(r"^(\w+) +\d+ blocks: quantize differs in (\d+), dequantize \(ref blocks\) (\d+), "
                      r"dequantize \(random bytes\) (\d+)$", out, re.M)
    return {t: (int(a), int(b), int(c)) for t, a, b, c in rows}


def test_metal_port_matches_the_c_reference(tree):
    r = _run(tree, 5000)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("OK"), r.stdout + r.stderr
    counts = _counts(r.stdout)
    assert set(counts) == set(TYPES), counts
    assert all(c == (0, 0, 0) for c in counts.values()), counts


def test_metal_check_catches_a_changed_codeword(tree, tmp_path):
    """A copy of the Metal kernels with one tcq3 codeword's bits changed: tcq3 must differ, and no other type."""
    src = tree / "ggml" / "src" / "ggml-metal" / "kernels"
    dst = tmp_path / "ggml" / "src" / "ggml-metal" / "kernels"
    shutil.copytree(src, dst)
    text = (dst / "dequantize.h").read_text()
    m = re.search(r"tcq3_codebook_bits\[256\] = \{\n    (0x[0-9a-f]{8})", text)
    assert m, "no tcq3 codebook in the Metal dequantize.h"
    first = m.group(1)
    changed = f"0x{int(first, 16) ^ 0x00400000:08x}"  # the mantissa's top bit: a codeword moved by a fraction
    (dst / "dequantize.h").write_text(text[:m.start(1)] + changed + text[m.end(1):])
    r = _run(tmp_path, 500)
    assert r.returncode != 0 and "FAIL" in r.stdout, r.stdout + r.stderr
    counts = _counts(r.stdout)
    assert counts["tcq3"][0] > 0 and counts["tcq3"][1] > 0, counts
    assert all(c == (0, 0, 0) for t, c in counts.items() if t != "tcq3"), counts
