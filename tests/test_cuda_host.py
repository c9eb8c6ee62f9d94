"""The CUDA code of the qaq types, proven on the CPU (no GPU needed, only nvcc).

tests/native/test_cuda_host.cu compiles native/ggml/ggml-qaq.cuh (which takes its per-block math from
ggml-qaq-common.h) with nvcc, calls its block quantizers and dequantizers as __host__ functions and compares them
byte for byte with the C reference native/ggml/ggml-qaq.c, compiled by the C compiler with -ffp-contract=off and
linked in, for every qaq type over random rows and edge cases. The second test shows the comparison can fail: the
CUDA side compiled from a copy of the shared header with one codebook level changed must report differences.

Run: pytest -m cuda_host tests/test_cuda_host.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GGML = ROOT / "native" / "ggml"
SRC = ROOT / "tests" / "native" / "test_cuda_host.cu"

pytestmark = pytest.mark.cuda_host


def _nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def _cc() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


@pytest.fixture(scope="module")
def tools():
    nvcc, cc = _nvcc(), _cc()
    if nvcc is None:
        pytest.skip("nvcc not found (not on PATH, not /usr/local/cuda/bin/nvcc, $NVCC unset): the CUDA host test needs "
                    "the CUDA toolkit's compiler, not a GPU")
    if cc is None:
        pytest.skip("no C compiler (gcc/cc, or $CC) for the C reference")
    return nvcc, cc


@pytest.fixture(scope="module")
def ref_obj(tools, tmp_path_factory):
    """The C reference, compiled as ggml-base compiles it (no FP contraction)."""
    _, cc = tools
    out = tmp_path_factory.mktemp("qaq_ref") / "ggml-qaq.o"
    subprocess.run([cc, "-std=c11", "-O2", "-ffp-contract=off", f"-I{GGML}", "-c", str(GGML / "ggml-qaq.c"),
                    "-o", str(out)], check=True, capture_output=True, text=True)
    return out


def _build_and_run(nvcc: str, ref_obj: Path, exe: Path, include_first: Path | None = None,
                   defines: tuple[str, ...] = (), blocks: int = 2000) -> subprocess.CompletedProcess:
    cmd = [nvcc, "-std=c++17", "-O2", "-Xcompiler", "-ffp-contract=off", "--fmad=false", *defines]
    if include_first is not None:
        cmd.append(f"-I{include_first}")
    cmd += [f"-I{GGML}", str(SRC), str(ref_obj), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, f"nvcc failed:\n{build.stdout}\n{build.stderr}"
    return subprocess.run([str(exe), str(blocks)], capture_output=True, text=True, timeout=600)


def test_cuda_host_matches_c_reference(tools, ref_obj, tmp_path):
    nvcc, _ = tools
    run = _build_and_run(nvcc, ref_obj, tmp_path / "qaq-cuda-host")
    print(run.stdout)
    assert run.returncode == 0 and "PASS" in run.stdout, run.stdout + run.stderr
    for t in ("qaq3", "qaq2", "qaq4l", "qaq3l", "qaq2l", "qaq4h", "qaq3h", "qaq2h", "tcq3", "tcq2"):
        assert f"{t} quantize: gaussian" in run.stdout and f"{t} dequantize (get_rows/cpy)" in run.stdout
    for t in ("tcq3", "tcq2"):  # the trellis types' quantizer is the warp's (lanes run one by one) and K.Q their own
        assert f"{t} K.Q (flash attention, q8_1 Q)" in run.stdout


def test_cuda_host_detects_a_drifted_codebook(tools, ref_obj, tmp_path):
    """A copy of the shared header with qaq3's level 45 moved to 44 and one tcq3 codeword doubled,
    seen by the CUDA side only: must fail for those types and no other."""
    nvcc, _ = tools
    drift = tmp_path / "drift"
    drift.mkdir()
    shutil.copy(GGML / "ggml-qaq.cuh", drift / "ggml-qaq.cuh")
    text = (GGML / "ggml-qaq-common.h").read_text()
    old = "#define QAQ3_KVALUES -127, -79, -45, -14, 14, 45, 79, 127"
    assert old in text
    code = "#define QAQ_TCQ3_CODEBOOK \\\n    -0x1.2bb4bp-2f,"
    assert code in text
    text = text.replace(old, old.replace(" 45,", " 44,")).replace(code, code.replace("p-2f", "p-1f"))
    (drift / "ggml-qaq-common.h").write_text(text)
    # the codebook's static_asserts would stop the compile first; the point here is the byte comparison
    run = _build_and_run(nvcc, ref_obj, tmp_path / "qaq-cuda-host-drift", include_first=drift,
                         defines=("-DQAQ_NO_CODEBOOK_CHECK",), blocks=200)
    print(run.stdout)
    assert run.returncode == 1 and "FAIL" in run.stdout, run.stdout + run.stderr
    assert "qaq3 quantize: gaussian" in run.stdout and "qaq2 quantize: gaussian" in run.stdout
    failed = [ln for ln in run.stdout.splitlines() if ln.rstrip().endswith("differ)") and "FAIL" in ln]
    assert failed and all(ln.startswith(("qaq3 ", "qaq3l ", "qaq3h ", "tcq3 ")) for ln in failed), failed
    assert any(ln.startswith("tcq3 quantize") for ln in failed) and any("tcq3 dequantize" in ln for ln in failed)
