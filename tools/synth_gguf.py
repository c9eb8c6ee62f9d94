#!/usr/bin/env python3
"""Write a random-weight llama-architecture GGUF of a real model's shape, for KV-cache speed benchmarks.

Speed depends on shapes and types, not on weight values, so a benchmark of a large model needs no download: this
writes Q4_0 (or f16) weights of random bytes with a small fixed scale, a plain token list (llama-bench draws random
token ids) and the hyperparameters of the chosen preset. Tensors are streamed to disk one at a time, so memory
stays at one tensor. The device machine has no network; run this there.

  python3 tools/synth_gguf.py --preset llama3-8b -o /tmp/llama3-8b-q4_0.gguf      # 4.3 GiB, ~1 min
  python3 tools/synth_gguf.py --preset kv-heavy -o /tmp/kv-heavy.gguf               # cache-bound decode, CPU
  python3 tools/synth_gguf.py --preset tiny -o /tmp/tiny.gguf                       # for a smoke test

Quality numbers never come from these models (their output is noise); they only time the cache.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

PRESETS = {
    # Llama-3.1-8B: 32 layers, 8 KV heads of 128 (GQA 4), FFN 14336, vocab 128256
    "llama3-8b": dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256, ctx=131072,
                      rope_base=500000.0),
    # the cache dominates the bytes a decoded token reads: 8 KV heads of 128 in each of 4 layers (16 KiB of f16 K+V
    # per token and layer) over ~25 MiB of weights, so decode speed at depth follows the cache type's bytes
    "kv-heavy": dict(n_layer=4, n_embd=2048, n_head=16, n_head_kv=8, n_ff=2048, n_vocab=1024, ctx=32768,
                     rope_base=10000.0),
    # a few MiB, same head layout: for checking the benchmark script itself
    "tiny": dict(n_layer=2, n_embd=512, n_head=4, n_head_kv=1, n_ff=1024, n_vocab=1024, ctx=65536,
                 rope_base=10000.0),
}


def random_weight(rng: np.random.Generator, rows: int, cols: int, qtype: GGMLQuantizationType) -> np.ndarray:
    """Raw bytes of a (rows, cols) weight: Q4_0 blocks with scale 2^-9 and random nibbles, or small f16 values."""
    if qtype == GGMLQuantizationType.F16:
        return (rng.standard_normal((rows, cols), np.float32) * 0.02).astype(np.float16)
    if qtype != GGMLQuantizationType.Q4_0:
        raise ValueError(f"unsupported weight type {qtype.name}")
    nb = cols // 32
    raw = rng.integers(0, 256, (rows, nb, 18), dtype=np.uint8)
    raw[:, :, 0:2] = np.frombuffer(np.float16(2.0 ** -9).tobytes(), np.uint8)
    return raw.reshape(rows, nb * 18)


def write(path: Path, preset: dict, qtype: GGMLQuantizationType, seed: int = 0) -> Path:
    p = preset
    hd = p["n_embd"] // p["n_head"]
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_name(f"synthetic-llama-{p['n_layer']}x{p['n_embd']}-{qtype.name.lower()}")
    w.add_context_length(p["ctx"])
    w.add_embedding_length(p["n_embd"])
    w.add_block_count(p["n_layer"])
    w.add_feed_forward_length(p["n_ff"])
    w.add_head_count(p["n_head"])
    w.add_head_count_kv(p["n_head_kv"])
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(p["rope_base"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(p["n_vocab"])
    w.add_file_type(2 if qtype == GGMLQuantizationType.Q4_0 else 1)
    # a plain SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, then filler pieces
    n_v = p["n_vocab"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"t{i}" for i in range(n_v - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n_v - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_v)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    shapes: list[tuple[str, tuple[int, int] | tuple[int]]] = [("token_embd.weight", (n_v, p["n_embd"]))]
    for i in range(p["n_layer"]):
        b = f"blk.{i}."
        shapes += [
            (b + "attn_norm.weight", (p["n_embd"],)),
            (b + "attn_q.weight", (p["n_embd"], p["n_embd"])),
            (b + "attn_k.weight", (p["n_head_kv"] * hd, p["n_embd"])),
            (b + "attn_v.weight", (p["n_head_kv"] * hd, p["n_embd"])),
            (b + "attn_output.weight", (p["n_embd"], p["n_embd"])),
            (b + "ffn_norm.weight", (p["n_embd"],)),
            (b + "ffn_gate.weight", (p["n_ff"], p["n_embd"])),
            (b + "ffn_up.weight", (p["n_ff"], p["n_embd"])),
            (b + "ffn_down.weight", (p["n_embd"], p["n_ff"])),
        ]
    shapes += [("output_norm.weight", (p["n_embd"],)), ("output.weight", (n_v, p["n_embd"]))]

    def data(shape):
        if len(shape) == 1:
            return np.ones(shape, np.float32)
        return random_weight(rng, shape[0], shape[1], qtype)

    for name, shape in shapes:  # declare every tensor first, then stream the data
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            row = data((1, shape[1]))  # one row: its dtype and byte count
            if qtype == GGMLQuantizationType.F16:
                w.add_tensor_info(name, shape, row.dtype, row.nbytes * shape[0])
            else:  # quantized tensors are declared by their byte shape
                w.add_tensor_info(name, (shape[0], row.shape[1]), row.dtype, row.nbytes * shape[0], raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, shape) in enumerate(shapes):
        w.write_tensor_data(data(shape))
        print(f"\r{i + 1}/{len(shapes)} tensors", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    w.close()
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    ap.add_argument("--weights", choices=["q4_0", "f16"], default="q4_0", help="weight type (default q4_0)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    write(a.output, PRESETS[a.preset], GGMLQuantizationType[a.weights.upper()], a.seed)
    print(f"wrote {a.output} ({a.output.stat().st_size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
