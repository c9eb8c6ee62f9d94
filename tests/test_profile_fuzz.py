"""Profiles are untrusted input: damaged and hostile profiles (tools/fuzz_corpus.py) through the native validator
and through Llama(kv_profile=...), each in a child process: every case either loads a valid profile or is refused
with a message that names the key or the problem; no signal, no hang, no message-less failure.

The three defects of issue 11 are tested by name: a profile naming the ggml type i32 (segfaulted), types that are
not cache types (q4_K, q2_K, tq1_0 ran), an absurd key mean (1e30) and an empty key-mean array (accepted)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qaq_gguf import profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import fuzz_corpus  # noqa: E402

# a refusal must say what is wrong: the key, or one of the problems the validator names
NAMED = ("qaq.", "GGUF", "not a KV cache type", "layer", "profile", "schema", "fingerprint", "model", "block",
         "truncated", "missing key")


@pytest.fixture(scope="module")
def seed_profile(tiny_model, tmp_path_factory) -> Path:
    """A valid profile for the tiny model with every optional key (transforms, statistics, scores, gains)."""
    ident = profile.model_identity(tiny_model)
    p = profile.make_profile(ident, ["q8_0", "q4_0"], ["qaq3", "f16"], {"method": "fuzz-seed"})
    nk, nv = ident.n_key_mean(), ident.n_value_mean()
    rng = np.random.default_rng(0)
    p.k_mean = rng.standard_normal(nk).astype(np.float32)
    p.k_scale = np.ones(nk, np.float32)
    p.v_mean = rng.standard_normal(nv).astype(np.float32)
    p.stats = {"k_mean": p.k_mean, "v_mean": p.v_mean, "k_first": p.k_mean, "v_first": p.v_mean}
    p.exact_cells = 4
    p.candidates = ["f16", "q8_0", "q4_0"]
    p.score_k = np.abs(rng.standard_normal((ident.n_layer, 3))).astype(np.float32)
    p.score_v = np.abs(rng.standard_normal((ident.n_layer, 3))).astype(np.float32)
    p.gain_k = np.abs(rng.standard_normal(ident.n_layer)).astype(np.float32)
    p.gain_v = np.abs(rng.standard_normal(ident.n_layer)).astype(np.float32)
    return profile.write_profile(p, tmp_path_factory.mktemp("fuzz") / "seed.gguf")


@pytest.fixture(scope="module")
def corpus(seed_profile) -> list[tuple[str, Path]]:
    out = []
    d = seed_profile.parent / "corpus"
    d.mkdir()
    for i, (name, data) in enumerate(fuzz_corpus.mutants(seed_profile.read_bytes())):
        f = d / f"m{i:05d}.gguf"
        f.write_bytes(data)
        out.append((name, f))
    return out


_CHILD = textwrap.dedent("""
    import json, sys
    import qaq_gguf
    import llama_cpp
    from qaq_gguf import runtime, ProfileError, Llama
    mode, model_path, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "check":
        llama_cpp.llama_backend_init()
        with runtime.quiet_llama_log():
            model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
        for f in files:
            try:
                runtime.check_profile(model, model_path, f)
                print(json.dumps({"f": f, "ok": True}), flush=True)
            except ProfileError as e:
                print(json.dumps({"f": f, "ok": False, "err": str(e)}), flush=True)
    else:
        for f in files:
            try:
                Llama(model_path, kv_profile=f, n_ctx=64, verbose=False)
                print(json.dumps({"f": f, "ok": True}), flush=True)
            except ProfileError as e:
                print(json.dumps({"f": f, "ok": False, "err": str(e)}), flush=True)
""")


def _run_child(mode: str, model: Path, files: list[Path], timeout: float) -> dict[str, dict]:
    r = subprocess.run([sys.executable, "-c", _CHILD, mode, str(model), *map(str, files)], capture_output=True,
                       text=True, timeout=timeout)
    got = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            got[row["f"]] = row
    if r.returncode != 0:
        done = len(got)
        bad = files[done] if done < len(files) else "?"
        raise AssertionError(f"the {mode} child died with {r.returncode} at {bad} (after {done} cases):\n"
                             f"{r.stderr[-3000:]}")
    return got


def _assert_named(rows: dict[str, dict], names: dict[str, str]) -> int:
    refused = 0
    for f, row in rows.items():
        if row["ok"]:
            continue
        refused += 1
        err = row["err"]
        assert err and any(w in err for w in NAMED), f"{names[f]}: message names nothing: {err!r}"
    return refused


def test_every_mutant_through_the_native_validator(tiny_model, corpus):
    files = [f for _, f in corpus]
    names = {str(f): n for n, f in corpus}
    rows = _run_child("check", tiny_model, files, timeout=300)
    assert len(rows) == len(files)
    refused = _assert_named(rows, names)
    assert refused > 0.8 * len(files), (refused, len(files))
    # the hostile values are all refused, and each message names the key it concerns
    for f, row in rows.items():
        n = names[f]
        # (ggml's GGUF API, which the native validator and the Python reader both read through, hands strings over up
        # to their first NUL, as llama.cpp reads every GGUF string: 'f16\0junk' reads as f16)
        if n == "qaq.kv.exact_cells:as-u32":  # 7 exact cells: a valid count, which must load
            assert row["ok"], (n, row.get("err"))
            continue
        if ":" in n and n.split(":")[0].startswith("qaq.kv.") and not n.endswith(":value=0.0") and "\\x00" not in n:
            key = n.split(":")[0]
            assert not row["ok"], n
            assert key in row["err"] or "not a KV cache type" in row["err"] or "has 0 entries" in row["err"], \
                (n, row["err"])


def test_mutants_through_llama(tiny_model, corpus):
    """Llama(kv_profile=...) (Python reader, then the native validator) on a sample of every mutant family."""
    by_family: dict[str, list] = {}
    for n, f in corpus:
        by_family.setdefault(n.split("@")[0].split("=")[0].split("#")[0], []).append((n, f))
    sample = [items[i] for items in by_family.values() for i in range(0, len(items), max(1, len(items) // 3))]
    files = [f for _, f in sample]
    rows = _run_child("llama", tiny_model, files, timeout=600)
    assert len(rows) == len(files)
    _assert_named(rows, {str(f): n for n, f in sample})


def _hostile(seed_profile: Path, tmp_path: Path, key: str, payload: bytes, vtype: int, name: str = "") -> Path:
    data = seed_profile.read_bytes()
    fields, _ = fuzz_corpus.parse(data)
    f = next(x for x in fields if x.key == key)
    out = tmp_path / f"{key}{name}.gguf"
    out.write_bytes(fuzz_corpus._replace_value(data, f, vtype, payload))
    return out


@pytest.mark.parametrize("bad", ["i32", "q4_K", "q2_K", "tq1_0"])
def test_types_that_are_not_cache_types_are_refused(tiny_model, seed_profile, tmp_path, bad):
    """The issue's first two defects: i32 segfaulted, q4_K/q2_K/tq1_0 ran."""
    for key in ("qaq.kv.type_k", "qaq.kv.type_v"):
        f = _hostile(seed_profile, tmp_path, key, fuzz_corpus._str_array([bad, bad]), fuzz_corpus.ARRAY, bad)
        rows = _run_child("llama", tiny_model, [f], timeout=60)
        row = rows[str(f)]
        assert not row["ok"] and "not a KV cache type" in row["err"] and repr(bad) in row["err"], row


def test_absurd_and_empty_key_means_are_refused(tiny_model, seed_profile, tmp_path):
    """The issue's third defect: a key mean of 1e30 and an empty key-mean array were accepted."""
    ident = profile.model_identity(tiny_model)
    huge = [1e30] * ident.n_key_mean()
    f1 = _hostile(seed_profile, tmp_path, "qaq.kv.k_mean", fuzz_corpus._f32_array(huge), fuzz_corpus.ARRAY, "-huge")
    f2 = _hostile(seed_profile, tmp_path, "qaq.kv.k_mean", fuzz_corpus._f32_array([]), fuzz_corpus.ARRAY, "-empty")
    for mode in ("check", "llama"):
        rows = _run_child(mode, tiny_model, [f1, f2], timeout=120)
        assert not rows[str(f1)]["ok"] and "qaq.kv.k_mean" in rows[str(f1)]["err"] and "outside" in rows[str(f1)]["err"]
        assert not rows[str(f2)]["ok"] and "qaq.kv.k_mean" in rows[str(f2)]["err"]


def test_seed_profile_is_valid(tiny_model, seed_profile):
    rows = _run_child("check", tiny_model, [seed_profile], timeout=60)
    assert rows[str(seed_profile)]["ok"], rows


def test_unknown_qaq_keys_are_warned_about(seed_profile, tmp_path):
    from conftest import rewrite_profile

    rewrite_profile(seed_profile, tmp_path / "extra.gguf", add={"qaq.kv.k_future": 1})
    with pytest.warns(UserWarning, match="unknown key 'qaq.kv.k_future'"):
        profile.read_profile(tmp_path / "extra.gguf")
