"""Shared fixtures: the real Gemma 3 270M, small synthetic GGUFs, and the bundled binaries."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import qaq_gguf  # noqa: F401  (binds llama-cpp-python to our library before anything imports llama_cpp)
from qaq_gguf import _native, models, profile
from qaq_gguf.server import Server

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def gemma() -> Path:
    return models.gemma3_270m()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct: Llama architecture, GQA (9 query heads over 3 KV heads of 64), no BOS, chat template."""
    return models.smollm2_135m()


@pytest.fixture(scope="session")
def gemma_ident(gemma):
    return profile.model_identity(gemma)


@pytest.fixture(scope="session")
def gemma_mixed(gemma_ident, tmp_path_factory):
    """(path, profile): a Gemma profile mixing our types and ggml's, V quantized (flash attention needed)."""
    n = gemma_ident.n_layer
    p = profile.make_profile(gemma_ident, ["q8_0" if i % 2 else "qaq4l" for i in range(n)],
                             ["q4_0" if i % 3 else "qaq3" for i in range(n)], {"method": "test"})
    return profile.write_profile(p, tmp_path_factory.mktemp("mixed") / "mixed.gguf"), p


@pytest.fixture(scope="session")
def eval_text() -> str:
    """Held-out text: WikiText-2 test when the shared data is beside the checkout, else the packaged sample of it."""
    f = SHARED_DATA / "wikitext-2-raw-test.txt"
    if not f.is_file():
        f = ROOT / "qaq_gguf" / "data" / "wikitext-2-test-sample.txt"
    return f.read_text()[:20000]


@pytest.fixture(scope="session")
def calib_text() -> str:
    """Calibration text: WikiText-2 validation when the shared data is beside the checkout, else the packaged
    sample of it (never the evaluation text)."""
    f = SHARED_DATA / "wikitext-2-valid.txt"
    if not f.is_file():
        f = ROOT / "qaq_gguf" / "data" / "wikitext-2-valid-sample.txt"
    return f.read_text()[:30000]


def write_synthetic_model(path: Path, n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512,
                          seed=0) -> Path:
    """A tiny random-weight llama-architecture GGUF (f32 weights, no tokenizer): for fast shape and error tests."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    hd = n_embd // n_head
    w.add_name(f"synthetic-{n_layer}x{n_embd}")
    w.add_context_length(4096); w.add_embedding_length(n_embd); w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff); w.add_head_count(n_head); w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(hd); w.add_layer_norm_rms_eps(1e-5); w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("none")
    f = lambda *s: (rng.standard_normal(s) * 0.02).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", f(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", f(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(p + "attn_q.weight", f(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", f(n_head_kv * hd, n_embd))
        w.add_tensor(p + "attn_v.weight", f(n_head_kv * hd, n_embd))
        w.add_tensor(p + "attn_output.weight", f(n_embd, n_embd))
        w.add_tensor(p + "ffn_gate.weight", f(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", f(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", f(n_embd, n_ff))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def calibrate_briefly(model, calib_text: str, tmp_path: Path, out: Path, *flags: str) -> Path:
    """`qaq-gguf calibrate MODEL` on one chunk of 128 tokens of ``calib_text`` (no chats) at 4.0 bits into ``out``,
    with ``flags`` added; returns the calibration text's file."""
    from qaq_gguf import cli

    text = tmp_path / "calib.txt"
    text.write_text(calib_text)
    assert cli.main(["calibrate", str(model), "--text", str(text), "--chunks", "1", "--ctx", "128",
                     "--chat-chunks", "0", *flags, "--budget", "4.0", "--threads", "2", "-o", str(out)]) == 0
    return text


def rewrite_profile(src, dst, replace: dict | None = None, add: dict | None = None) -> Path:
    """A copy of a profile file with some keys' values replaced and others added, as a hand-edited file would have
    them: no check of what they pair with. Added values: a list or array as float32s, an int as uint32."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    replace, add = replace or {}, add or {}
    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), arch=profile.PROFILE_TYPE)
    for fld in r.fields.values():
        if fld.name.startswith("GGUF.") or fld.name == "general.architecture":
            continue
        val = replace.get(fld.name, fld.contents())
        if fld.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(fld.name, list(val), fld.types[0], sub_type=fld.types[-1])
        else:
            w.add_key_value(fld.name, val, fld.types[0])
    for key, val in add.items():
        if isinstance(val, int):
            w.add_uint32(key, val)
        else:
            w.add_array(key, [float(x) for x in np.asarray(val, np.float32)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_synthetic_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture
def server_factory(tmp_path):
    servers = []

    def start(args: list[str]) -> Server:
        s = Server(args, tmp_path / f"server{len(servers)}.log")
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def has_cuda() -> bool:
    ffi, lib = _native.ffi_lib()
    import llama_cpp

    llama_cpp.llama_backend_init()
    return "CUDA" in _native.backend_names() and os.environ.get("CUDA_VISIBLE_DEVICES") != ""


def synthetic_calibration(n_layer: int = 3, n_tok: int = 512, n_ctx: int = 256, n_head: int = 4, n_head_kv: int = 2,
                          head_dim: int = 64, seed: int = 0, fingerprint: str = "synthetic-fingerprint"):
    """A Calibration (qaq_gguf.methods) of random activations shaped like a small model's: keys with a few
    high-energy channels and a large first (BOS) token, RoPE applied at the chunk positions, positive
    sensitivity weights. For fast method tests that need no model run."""
    from qaq_gguf import rope as rope_mod
    from qaq_gguf.methods import CalibLayer, Calibration

    rng = np.random.default_rng(seed)
    ident = profile.ModelIdentity("synthetic", n_layer, [n_head_kv] * n_layer, [head_dim] * n_layer,
                                  [head_dim] * n_layer, [False] * n_layer, 0, fingerprint, "synthetic")
    rp = rope_mod.RopeParams(n_rot=head_dim, neox=True, freq_base=10000.0, freq_scale=1.0)
    pos = np.arange(n_tok) % n_ctx
    layers = {}
    for il in range(n_layer):
        scale = np.ones(head_dim, np.float32)
        scale[rng.choice(head_dim, 4, replace=False)] = 6.0  # outlier channels
        k_pre = (rng.standard_normal((n_tok, n_head_kv, head_dim)) * scale + 0.5).astype(np.float32)
        k_pre[pos == 0] *= 4.0  # a sink-like first token
        k = rope_mod.rope(k_pre, pos, rp)
        v = rng.standard_normal((n_tok, n_head_kv, head_dim)).astype(np.float32)
        layers[il] = CalibLayer(
            k=k, v=v, pos=pos.astype(np.int64), q_sq=np.abs(rng.standard_normal((n_head_kv, head_dim))).astype(
                np.float32), q_norm2=np.abs(rng.standard_normal((n_tok, n_head))).astype(np.float32) * head_dim,
            k_weight=np.abs(rng.standard_normal(k.shape)).astype(np.float32),
            v_weight=np.abs(rng.standard_normal((n_tok, n_head_kv))).astype(np.float32),
            attn_recv=np.where(pos == 0, 0.5, 1.0 / np.maximum(pos, 1))[:, None].repeat(n_head_kv, 1).astype(
                np.float32),
            attn_last=np.where(pos == 0, 0.5, 1.0 / np.maximum(n_ctx - pos, 1))[:, None].repeat(n_head_kv, 1).astype(
                np.float32),
            kq_scale=1.0 / np.sqrt(head_dim), n_head=n_head, rope=rp)
    return Calibration(ident, layers, n_ctx, n_tok // n_ctx)


@pytest.fixture
def synth_calib():
    """synthetic_calibration() with its defaults; call synthetic_calibration(...) for other shapes."""
    return synthetic_calibration()
