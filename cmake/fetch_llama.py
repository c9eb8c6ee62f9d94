#!/usr/bin/env python3
"""Obtain the pinned llama.cpp source tree and apply qaq-gguf's patches to it.

The tree is the `vendor/llama.cpp` folder of the llama-cpp-python sdist on PyPI (llama.cpp commit 0c1e57098). This
script is run by CMake at configure time and prints the path of the patched tree on its last line of stdout.

Steps, each failing with a message that names its cause:
  1. find the sdist: $QAQ_LLAMA_SDIST, else the download cache, else `pip download` from the package index;
  2. check its sha256 against the pinned one;
  3. extract vendor/llama.cpp into a cache folder named after the sdist hash and the patch contents, so an
     unchanged tree keeps one stable path (compiler caches hit across clean checkouts);
  4. apply patches/*.patch in name order; a patch that does not apply stops here with its name;
  5. optionally provide the llama-server web UI (built with npm from the sdist's tools/ui, cached by content).
CMake runs steps 1-4 at configure time (`--no-ui`) and step 5 as a build step (`--ui-only`), so that npm's UI build
runs beside the compile rather than before it.

Environment: QAQ_GGUF_CACHE (cache root, default ~/.cache/qaq-gguf), QAQ_LLAMA_SDIST (a local sdist),
QAQ_BUILD_UI (auto|on|off; auto builds the UI when npm is on PATH).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_COMMIT = "0c1e57098"
VENDOR_PREFIX = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
LAYOUT_VERSION = "1"  # bump when the way the tree is prepared changes


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"qaq-gguf: {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("QAQ_GGUF_CACHE", Path.home() / ".cache" / "qaq-gguf"))


def find_sdist(cache: Path) -> Path:
    """Return a verified sdist, downloading it into the cache when needed."""
    explicit = os.environ.get("QAQ_LLAMA_SDIST")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise BuildError(f"QAQ_LLAMA_SDIST={explicit} is not a file")
        check_sha256(path)
        return path
    path = cache / "sdist" / SDIST_FILE
    if path.is_file():
        try:
            check_sha256(path)
            return path
        except BuildError as e:
            log(f"{e}; downloading it again")
            path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        log(f"downloading the {SDIST_NAME}=={SDIST_VERSION} sdist (llama.cpp {LLAMA_COMMIT}) from the package index")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-d", tmp, f"{SDIST_NAME}=={SDIST_VERSION}"]
        # inside pip's isolated build environment PYTHONPATH hides the interpreter's own pip: run it plainly
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        got = Path(tmp) / SDIST_FILE
        if r.returncode != 0 or not got.is_file():
            raise BuildError(
                f"could not download the {SDIST_NAME}=={SDIST_VERSION} sdist, which holds the pinned llama.cpp "
                f"source.\n{r.stdout[-2000:]}\nOffline? Download {SDIST_FILE} elsewhere and set "
                f"QAQ_LLAMA_SDIST=/path/to/{SDIST_FILE}.")
        check_sha256(got)
        os.replace(got, path)
    return path


def check_sha256(path: Path) -> None:
    actual = sha256_file(path)
    if actual != SDIST_SHA256:
        raise BuildError(f"{path} has sha256 {actual}, expected {SDIST_SHA256} ({SDIST_NAME} {SDIST_VERSION}); "
                         "the file is corrupt or not the pinned sdist")


def patch_list(patches_dir: Path) -> list[Path]:
    return sorted(p for p in patches_dir.glob("*.patch") if p.is_file())


def tree_key(patches: list[Path]) -> str:
    h = hashlib.sha256(f"{LAYOUT_VERSION}:{SDIST_SHA256}".encode())
    for p in patches:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def extract(sdist: Path, dest: Path) -> None:
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(VENDOR_PREFIX):
                    continue
                rel = m.name[len(VENDOR_PREFIX):]
                if not rel or rel == ".git" or rel.startswith(".git/"):
                    continue  # a submodule pointer, not source
                m.name = rel
                members.append(m)
            if not members:
                raise BuildError(f"{sdist} has no {VENDOR_PREFIX} folder")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BuildError(f"cannot extract {sdist}: {e}") from e


def apply_patch(tree: Path, patch: Path) -> None:
    if shutil.which("git"):
        cmd = ["git", "apply", "--whitespace=nowarn", "-p1", str(patch)]
    elif shutil.which("patch"):
        cmd = ["patch", "-p1", "--forward", "--batch", "-i", str(patch)]
    else:
        raise BuildError("neither git nor patch is on PATH; one is needed to apply patches/")
    # GIT_DIR keeps git from looking for an enclosing repository
    env = dict(os.environ, GIT_DIR=str(tree / ".nogit"))
    r = subprocess.run(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if r.returncode != 0:
        raise BuildError(f"patch {patch.name} does not apply to llama.cpp {LLAMA_COMMIT}:\n{r.stdout.strip()}")


def sync_tree(src: Path, dest: Path) -> int:
    """Make dest a copy of src, rewriting only files whose content differs (unchanged files keep their mtime, so
    a rebuild after a patch change recompiles only what the patch touched). Returns the number of files written."""
    written = 0
    for f in src.rglob("*"):
        if f.is_dir() or f.is_symlink() and not f.exists():
            continue
        d = dest / f.relative_to(src)
        data = f.read_bytes()
        if d.is_file() and d.read_bytes() == data:
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        d.write_bytes(data)
        shutil.copymode(f, d)
        written += 1
    for d in sorted(dest.rglob("*"), reverse=True):
        rel = d.relative_to(dest)
        if rel.parts[0] == ".qaq-ready" or rel.parts[:3] == ("tools", "ui", "dist"):
            continue
        if not (src / rel).exists() and not (src / rel).is_symlink():
            d.rmdir() if d.is_dir() else d.unlink()
    return written


def prepare_tree(sdist: Path, patches: list[Path], cache: Path) -> Path:
    """The patched tree, at a path that stays the same across patch changes and clean checkouts."""
    dest = cache / "src" / f"llama.cpp-{LLAMA_COMMIT}"
    stamp = dest / ".qaq-ready"
    key = tree_key(patches)
    if stamp.is_file() and stamp.read_text().split("\n", 1)[0] == key:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / ".lock", "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build prepares the tree at a time
        except ImportError:
            pass
        if stamp.is_file() and stamp.read_text().split("\n", 1)[0] == key:
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
        try:
            extract(sdist, tmp)
            for p in patches:
                log(f"applying {p.name}")
                apply_patch(tmp, p)
            stamp.unlink(missing_ok=True)
            n = sync_tree(tmp, dest)
            log(f"updated {n} files in {dest}")
            stamp.write_text(key + "\n" + "\n".join(p.name for p in patches) + "\n")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def provide_ui(tree: Path, cache: Path, mode: str) -> str:
    """Put a built web UI into tree/tools/ui/dist (which llama.cpp's ui-assets.cmake embeds first)."""
    ui_src = tree / "tools" / "ui"
    dist = ui_src / "dist"
    if (dist / "index.html").is_file():
        return "present"
    npm = shutil.which("npm")
    if mode == "off" or (mode == "auto" and not npm):
        return "skipped (npm not found)" if not npm else "skipped (QAQ_BUILD_UI=off)"
    if not npm:
        raise BuildError("QAQ_BUILD_UI=on but npm is not on PATH")
    h = hashlib.sha256()
    for f in sorted(ui_src.rglob("*")):
        if f.is_file() and "node_modules" not in f.parts:
            h.update(str(f.relative_to(ui_src)).encode())
            h.update(f.read_bytes())
    built = cache / "ui" / h.hexdigest()[:16] / "dist"
    if not (built / "index.html").is_file():
        work = cache / "ui" / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(ui_src, work, ignore=shutil.ignore_patterns("node_modules", "dist"))
        out = Path(tempfile.mkdtemp(prefix=".dist-", dir=built.parent.parent))
        log("building the llama-server web UI with npm (cached after the first build)")
        env = dict(os.environ, LLAMA_UI_OUT_DIR=str(out))
        for cmd in (["npm", "ci", "--no-audit", "--no-fund"], ["npm", "run", "build"]):
            r = subprocess.run(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            if r.returncode != 0:
                shutil.rmtree(out, ignore_errors=True)
                msg = f"`{' '.join(cmd)}` failed for the web UI:\n{r.stdout[-3000:]}"
                if mode == "on":
                    raise BuildError(msg)
                log(msg + "\nllama-server will be built without its web UI (QAQ_BUILD_UI=off silences this)")
                return "failed"
        if not (out / "index.html").is_file():
            raise BuildError(f"npm run build produced no index.html in {out}")
        built.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(built, ignore_errors=True)
        os.rename(out, built)
        shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(built, dist)
    return "built"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=Path, help="folder of NNNN-*.patch files (needed but with --ui-only)")
    ap.add_argument("--ui", default=os.environ.get("QAQ_BUILD_UI", "auto"), choices=["auto", "on", "off"])
    step = ap.add_mutually_exclusive_group()
    step.add_argument("--no-ui", action="store_true", help="prepare the tree only (steps 1-4)")
    step.add_argument("--ui-only", type=Path, metavar="TREE", help="provide the web UI to a prepared tree (step 5)")
    args = ap.parse_args(argv)
    if not args.ui_only and args.patches is None:
        ap.error("--patches is required")
    try:
        cache = cache_root()
        if args.ui_only:
            log(f"llama-server web UI: {provide_ui(args.ui_only, cache, args.ui)}")
            return 0
        patches = patch_list(args.patches)
        sdist = find_sdist(cache)
        tree = prepare_tree(sdist, patches, cache)
        ui = "left to the build" if args.no_ui else provide_ui(tree, cache, args.ui)
        log(f"llama.cpp {LLAMA_COMMIT} with {len(patches)} patches at {tree}; web UI: {ui}")
    except BuildError as e:
        print(f"qaq-gguf build error: {e}", file=sys.stderr)
        return 1
    print(tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
