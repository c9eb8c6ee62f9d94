"""ggml-cpu's qaq and tcq kernels as each instruction set builds them, against the C reference.

The build compiles native/ggml/ggml-qaq-cpu.c for this machine only (GGML_NATIVE): on an AVX-512 machine the tests
that go through ggml see the AVX-512 trellis walk and never the AVX2 or scalar code a user's other machine runs.
Here the file is compiled once per instruction set this CPU can run (baseline x86-64, AVX2, AVX-512) beside the C
reference (ggml-qaq.c) with tests/native/test_cpu_isa.c: every type's cache write (from_float) must write the
reference's bytes and its row dequantizer the reference's values. The last test shows the check fails on a changed
walk.

Run: pytest tests/test_cpu_isa.py
"""
from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cuda_compile import _tree  # the patched llama.cpp tree the package build extracted (current patches only)

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native" / "ggml"
DRIVER = ROOT / "tests" / "native" / "test_cpu_isa.c"

# name: (compiler flags, /proc/cpuinfo flags this CPU needs to run the build)
ISAS = {
    "scalar": (["-march=x86-64"], ()),
    "avx2": (["-march=haswell"], ("avx2", "fma", "f16c")),
    "avx512": (["-march=skylake-avx512"], ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq")),
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.fixture(scope="module")
def tree() -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"the instruction sets compared here are x86's ({platform.machine()} builds one path)")
    t, why = _tree()
    if t is None:
        pytest.skip(why)
    return t


def _build(tree: Path, flags: list[str], out: Path, cpu_c: Path = NATIVE / "ggml-qaq-cpu.c") -> Path:
    inc = [f"-I{NATIVE}", f"-I{tree / 'ggml' / 'include'}", f"-I{tree / 'ggml' / 'src'}",
           f"-I{tree / 'ggml' / 'src' / 'ggml-cpu'}"]
    cmd = ["gcc", "-O2", "-std=c11", "-ffp-contract=off", "-Wall", "-Werror", "-Wno-unused-function", *flags, *inc,
           str(DRIVER), str(cpu_c), str(NATIVE / "ggml-qaq.c"), "-lm", "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("isa", list(ISAS))
def test_cpu_kernels_match_the_reference(tree, tmp_path, isa):
    flags, needs = ISAS[isa]
    missing = [f for f in needs if f not in _cpu_flags()]
    if missing:
        pytest.skip(f"this CPU cannot run the {isa} build (no {', '.join(missing)})")
    exe = _build(tree, flags, tmp_path / f"test_cpu_isa_{isa}")
    r = subprocess.run([str(exe), "3000"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("PASS 3000 rows"), r.stdout + r.stderr


def test_check_catches_a_changed_walk(tree, tmp_path):
    """A copy of ggml-qaq-cpu.c whose vectorized walks tag each candidate with the wrong top: tcq3 must fail."""
    isa = next((i for i in ("avx512", "avx2") if all(f in _cpu_flags() for f in ISAS[i][1])), None)
    if isa is None:
        pytest.skip("no vectorized walk this CPU runs")
    text = (NATIVE / "ggml-qaq-cpu.c").read_text()
    changed = text.replace("_mm512_set1_epi32(top), 0xEA)", "_mm512_set1_epi32(K - 1 - top), 0xEA)").replace(
        "_mm256_set1_epi32(top)));", "_mm256_set1_epi32(K - 1 - top)));")
    assert changed.count("K - 1 - top") == 2, "the walks' tagging lines moved: update this test"
    src = tmp_path / "ggml-qaq-cpu.c"
    src.write_text(changed)
    exe = _build(tree, ISAS[isa][0], tmp_path / "changed", src)
    r = subprocess.run([str(exe), "50"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and r.stdout.startswith("FAIL tcq3 row 0: from_float"), r.stdout + r.stderr
