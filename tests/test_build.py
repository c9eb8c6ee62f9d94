"""Issue 2: the package runs on its own patched llama.cpp build, and the build step fails clearly."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import qaq_gguf
from qaq_gguf import _native

ROOT = Path(__file__).resolve().parent.parent
FETCH = ROOT / "cmake" / "fetch_llama.py"


def test_loaded_libllama_is_ours():
    import llama_cpp

    loaded = Path(llama_cpp.llama_cpp._lib._name).resolve()
    assert loaded.parent == qaq_gguf.LIB_DIR
    assert loaded.parent.name == "lib" and loaded.parent.parent.name == "qaq_gguf"
    assert _native.version() == qaq_gguf.__version__
    # the symbols our patches add are exported by the very file llama_cpp loaded
    assert hasattr(llama_cpp.llama_cpp._lib, "llama_model_set_kv_layer_types")
    assert hasattr(llama_cpp.llama_cpp._lib, "qaq_model_apply_kv_profile")


def test_import_llama_cpp_first_finds_our_library():
    """What every app on llama-cpp-python does (LangChain, LlamaIndex, python -m llama_cpp.server): import llama_cpp
    with no qaq_gguf import at all. The wheel's startup hook (qaq_gguf.pth) points the bindings at our library."""
    code = ("import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.llama_cpp._lib._name).resolve().parent); "
            "print(hasattr(llama_cpp.llama_cpp._lib, 'qaq_model_apply_kv_profile'))")
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert r.returncode == 0, r.stderr
    lib_dir, has_qaq = r.stdout.split()
    assert has_qaq == "True" and Path(lib_dir).name == "lib" and Path(lib_dir).parent.name == "qaq_gguf", r.stdout
    # and llama_cpp then qaq_gguf in one process agree on the library
    r = subprocess.run([sys.executable, "-c", "import llama_cpp\nimport qaq_gguf\nprint(qaq_gguf.LIB_DIR)"],
                       capture_output=True, text=True, env=env, cwd="/")
    assert r.returncode == 0 and Path(r.stdout.strip()) == Path(lib_dir), (r.stdout, r.stderr)


def test_llama_cpp_imported_first_with_another_library_is_an_error(tmp_path):
    other = tmp_path / "otherlib"
    shutil.copytree(qaq_gguf.LIB_DIR, other)
    code = "import llama_cpp\nimport qaq_gguf\n"
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(other))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    assert "llama_cpp has loaded" in r.stderr and "not qaq-gguf's patched build" in r.stderr, r.stderr
    assert "import qaq_gguf before llama_cpp" in r.stderr, r.stderr


def test_conflicting_lib_path_env_is_an_error(tmp_path):
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", "import qaq_gguf"], env=env, capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode != 0 and "points at another llama.cpp build" in r.stderr


def test_generate_with_gemma(gemma):
    from llama_cpp import Llama

    llm = Llama(str(gemma), n_ctx=256, verbose=False, seed=0)
    out = llm("The capital of France is", max_tokens=16, temperature=0.0)
    text = out["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] > 0 and text.strip()
    again = llm("The capital of France is", max_tokens=16, temperature=0.0)["choices"][0]["text"]
    assert again == text  # greedy decoding is deterministic


@pytest.mark.parametrize("exe,args", [("llama-server", ["--version"]), ("llama-perplexity", ["--version"]),
                                      ("llama-bench", ["--help"])])
def test_bundled_binaries_start(exe, args):
    r = subprocess.run([str(_native.bin_dir() / exe), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert ("0c1e570" in r.stdout + r.stderr) if args == ["--version"] else "usage" in r.stdout.lower()


def test_server_answers_a_completion(gemma, server_factory):
    s = server_factory(["-m", str(gemma), "-c", "512", "-t", "2", "-np", "1"])
    s.wait_ready()
    res = s.post("/completion", {"prompt": "The capital of France is", "n_predict": 8, "temperature": 0})
    assert res["content"].strip() and res["tokens_predicted"] > 0
    status, ctype, body = s.get("/")
    assert status == 200
    assert "text/html" in ctype and len(body) > 1000  # the web chat UI is embedded, not a missing page


def test_cli_info_names_library_and_cpu():
    r = subprocess.run([sys.executable, "-m", "qaq_gguf.cli", "info", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json

    info = json.loads(r.stdout)
    assert info["native_qaq_version"] == qaq_gguf.__version__
    assert info["llama_cpp_commit"].startswith("0c1e570")
    assert Path(info["library"]).parent == qaq_gguf.LIB_DIR
    assert "CPU" in info["backends"] and any(d["type"] == "cpu" for d in info["devices"])


# --- the build's source step (cmake/fetch_llama.py) ---------------------------------------------------------

def _sdist() -> Path:
    p = Path(os.environ.get("QAQ_GGUF_CACHE", Path.home() / ".cache" / "qaq-gguf")) / "sdist" / \
        "llama_cpp_python-0.3.36.tar.gz"
    if not p.is_file():
        pytest.skip("no cached sdist (the package was installed from a prepared tree)")
    return p


def _fetch(tmp_path, patches: Path, sdist: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, QAQ_GGUF_CACHE=str(tmp_path / "cache"), QAQ_LLAMA_SDIST=sdist, QAQ_BUILD_UI="off")
    return subprocess.run([sys.executable, str(FETCH), "--patches", str(patches)], env=env, capture_output=True,
                          text=True, timeout=600)


def test_patch_that_does_not_apply_stops_the_build_with_its_name(tmp_path):
    patches = tmp_path / "patches"
    shutil.copytree(ROOT / "patches", patches)
    (patches / "0099-broken.patch").write_text(
        "--- a/src/llama.cpp\n+++ b/src/llama.cpp\n@@ -1,3 +1,3 @@\n-this line is not in llama.cpp\n+x\n context\n")
    r = _fetch(tmp_path, patches, str(_sdist()))
    assert r.returncode != 0
    assert "patch 0099-broken.patch does not apply to llama.cpp 0c1e57098" in r.stderr


def test_our_patches_apply_to_the_pinned_sdist(tmp_path):
    r = _fetch(tmp_path, ROOT / "patches", str(_sdist()))
    assert r.returncode == 0, r.stderr
    tree = Path(r.stdout.strip().splitlines()[-1])
    assert "llama_model_set_kv_layer_types" in (tree / "include" / "llama.h").read_text()
    assert "--kv-profile" in (tree / "common" / "arg.cpp").read_text()


def test_missing_or_corrupt_sdist_is_named(tmp_path):
    r = _fetch(tmp_path, ROOT / "patches", str(tmp_path / "nope.tar.gz"))
    assert r.returncode != 0 and "nope.tar.gz is not a file" in r.stderr
    bad = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    bad.write_bytes(b"not a tarball")
    r = _fetch(tmp_path, ROOT / "patches", str(bad))
    assert r.returncode != 0 and "expected 832db069" in r.stderr and "corrupt" in r.stderr


def test_web_ui_is_a_build_step_of_its_own(tmp_path):
    """CMake prepares the tree without the web UI (`--no-ui`) and provides it as a build step (`--ui-only`), so the
    npm build runs beside the compile; a tree that has its UI keeps it."""
    tree = tmp_path / "tree"
    (tree / "tools" / "ui" / "src").mkdir(parents=True)
    (tree / "tools" / "ui" / "src" / "app.ts").write_text("export {}\n")
    env = dict(os.environ, QAQ_GGUF_CACHE=str(tmp_path / "cache"))
    run = lambda *a: subprocess.run([sys.executable, str(FETCH), *a], env=env, capture_output=True, text=True,
                                    timeout=60)
    r = run("--ui-only", str(tree), "--ui", "off")
    assert r.returncode == 0 and "web UI: skipped (QAQ_BUILD_UI=off)" in r.stderr
    assert not (tree / "tools" / "ui" / "dist").exists()
    (tree / "tools" / "ui" / "dist").mkdir()
    (tree / "tools" / "ui" / "dist" / "index.html").write_text("<html></html>")
    r = run("--ui-only", str(tree), "--ui", "on")
    assert r.returncode == 0 and "web UI: present" in r.stderr
    r = run("--no-ui")
    assert r.returncode == 2 and "--patches is required" in r.stderr
    r = run("--ui-only", str(tree), "--no-ui", "--patches", "x")
    assert r.returncode == 2 and "not allowed with" in r.stderr
