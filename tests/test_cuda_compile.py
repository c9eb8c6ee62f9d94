"""The CUDA build of the qaq types for sm_90a as a gate, no GPU needed (tools/cuda_compile_check.sh).

The check compiles set-rows.cu, cpy.cu, getrows.cu and convert.cu from the patched llama.cpp with every warning an
error (ptxas's spill and local-memory warnings included) and one flash-attention vector instance per qaq and tcq type (the
diagonal pairs), whose per-kernel ptxas figures must be no worse than docs/results/cuda-ptxas/. The first test runs
it (about 4 minutes cold on 2 cores, about a second with a warm ccache); the other two show it fails: on a kernel
whose stack frame and spills grew against a baseline, and on a header change that breaks the CUDA compile.

Run: pytest -m cuda_host tests/test_cuda_compile.py
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cuda_host import _nvcc  # one way to find nvcc (NVCC, PATH, /usr/local/cuda)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "cuda_compile_check.sh"
BASELINE = ROOT / "docs" / "results" / "cuda-ptxas"
FA_QAQ3 = "template-instances/fattn-vec-instance-qaq3-qaq3.cu"
TYPES = ("qaq3", "qaq2", "qaq4l", "qaq3l", "qaq2l", "qaq4h", "qaq3h", "qaq2h", "tcq3", "tcq2")

pytestmark = pytest.mark.cuda_host


def _tree() -> tuple[Path | None, str]:
    """The patched llama.cpp tree the package build extracted, or None and why not."""
    if os.environ.get("LLAMA_SRC"):
        return Path(os.environ["LLAMA_SRC"]), ""
    cache = Path(os.environ.get("QAQ_GGUF_CACHE", Path.home() / ".cache" / "qaq-gguf"))
    trees = sorted((cache / "src").glob("llama.cpp-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not trees or not (trees[0] / "ggml" / "src" / "ggml-cuda" / "dequantize.cuh").is_file():
        return None, (f"no patched llama.cpp tree under {cache / 'src'} (the package build extracts it; or set "
                      "LLAMA_SRC)")
    # a tree prepared from other patches would check old code: the build's own key says whether it is current
    spec = importlib.util.spec_from_file_location("fetch_llama", ROOT / "cmake" / "fetch_llama.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    stamp = trees[0] / ".qaq-ready"
    key = fetch.tree_key(fetch.patch_list(ROOT / "patches"))
    if not stamp.is_file() or stamp.read_text().split("\n", 1)[0] != key:
        return None, f"{trees[0]} was patched from other patches/ than this checkout's (a package build refreshes it)"
    return trees[0], ""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (not on PATH, not /usr/local/cuda/bin/nvcc, $NVCC unset): the CUDA compile "
                    "check needs the CUDA toolkit's compiler, not a GPU")
    tree, why = _tree()
    if tree is None:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("cuda_ptxas")
    return dict(os.environ, NVCC=nvcc, LLAMA_SRC=str(tree), OUT=str(out))


def _run(env: dict, *files: str, **extra: str) -> subprocess.CompletedProcess:
    run = subprocess.run(["bash", str(SCRIPT), *files], env=dict(env, **extra), capture_output=True, text=True,
                         timeout=3600)
    print(run.stdout, run.stderr)
    return run


@pytest.mark.slow
def test_cuda_compile_check_passes(env):
    run = _run(env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASS: 14 files" in run.stdout
    for f in ("set-rows.cu", "cpy.cu", "getrows.cu", "convert.cu",
              *(f"template-instances/fattn-vec-instance-{t}-{t}.cu" for t in TYPES)):
        assert f"{f}: compiled" in run.stdout
    assert "FAIL" not in run.stdout


def test_cuda_compile_check_fails_on_grown_stack_and_spills(env, tmp_path):
    """A baseline whose largest stack frame is 8 bytes smaller and whose spill stores there are 8 bytes fewer (or
    absent): the same compile must fail, naming that kernel. (A cache hit after the test above.)"""
    text = (BASELINE / Path(FA_QAQ3).with_suffix(".txt").name).read_text()
    frames = [(int(m.group(1)), m) for m in re.finditer(r"^ +(\d+) bytes stack frame, (\d+) bytes spill stores", text,
                                                         re.M)]
    size, m = max(frames, key=lambda fm: fm[0])
    assert size >= 8, "the baseline has no stack frame to shrink"
    spills = int(m.group(2))
    shrunk = f"{' ' * 4}{size - 8} bytes stack frame, {max(spills - 8, 0)} bytes spill stores"
    (tmp_path / Path(FA_QAQ3).with_suffix(".txt").name).write_text(text[:m.start()] + shrunk + text[m.end():])
    run = _run(env, FA_QAQ3, BASELINE=str(tmp_path))
    assert run.returncode == 1, run.stdout + run.stderr
    fail = [ln for ln in run.stdout.splitlines() if ln.lstrip().startswith("FAIL ")]
    assert len(fail) == 1 and "flash_attn_ext_vec<" in fail[0], fail
    assert f"stack {size - 8}->{size} B" in fail[0]
    assert run.stdout.rstrip().splitlines()[-1].startswith("FAIL: 1 files")


def test_cuda_compile_check_fails_on_a_broken_header(env, tmp_path):
    """A copy of native/ggml with qaq3's level 45 moved to 44: the codebook's static_assert stops the CUDA compile
    (about a second: it fails in the front end)."""
    broken = tmp_path / "ggml"
    shutil.copytree(ROOT / "native" / "ggml", broken)
    old = "#define QAQ3_KVALUES -127, -79, -45, -14, 14, 45, 79, 127"
    text = (broken / "ggml-qaq-common.h").read_text()
    assert old in text
    (broken / "ggml-qaq-common.h").write_text(text.replace(old, old.replace(" 45,", " 44,")))
    run = _run(env, "convert.cu", QAQ_GGML=str(broken))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL convert.cu: nvcc exit" in run.stdout and "qaq3 codebook changed" in run.stdout
