#!/usr/bin/env python3
"""Damaged and hostile variants of a qaq KV profile, for the validator's fuzz test and as libFuzzer seeds.

    python3 tools/fuzz_corpus.py PROFILE.gguf -o corpus/          # write every mutant of PROFILE into corpus/

Mutants (each a complete file):
- truncations at every field of the GGUF structure (header, each key's length, name, type and value) and one
  byte past it;
- huge counts: the tensor and key counts, every string and array length set to 2^32, 2^62 and 2^64-1;
- bit flips at seeded random positions;
- hostile values for every qaq.* key: the wrong GGUF type, NaN, inf, 1e30 and -1e30 in float arrays, negative and
  huge integers, empty and one-short arrays, type names that are not cache types (i32, q4_K, q2_K, tq1_0, an empty
  string, a megabyte of 'x').

``mutants(data)`` yields (name, bytes) for use from Python (tests/test_profile_fuzz.py).
"""
from __future__ import annotations

import argparse
import random
import struct
import sys
from pathlib import Path

# GGUF value types (gguf.h): size of a scalar, or None for string/array
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY, FLOAT32, UINT32, INT32 = 8, 9, 6, 4, 5


class Field:
    """One key of a GGUF file: byte offsets of its parts and what the value is."""

    def __init__(self, key, off_keylen, off_type, off_value, end, vtype, subtype=None, n=None, off_n=None):
        self.key, self.off_keylen, self.off_type, self.off_value, self.end = key, off_keylen, off_type, off_value, end
        self.vtype, self.subtype, self.n, self.off_n = vtype, subtype, n, off_n
        self.string_lens: list[int] = []  # offsets of the u64 length of each string in the value


def parse(data: bytes) -> tuple[list[Field], int]:
    """The key/value fields of a GGUF file (version 3, little-endian) and the offset where the tensor infos begin."""
    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    off = 24
    fields = []
    for _ in range(n_kv):
        f0 = off
        klen = struct.unpack_from("<Q", data, off)[0]
        key = data[off + 8:off + 8 + klen].decode()
        off += 8 + klen
        t_off = off
        vtype = struct.unpack_from("<I", data, off)[0]
        off += 4
        v_off = off
        fld = Field(key, f0, t_off, v_off, 0, vtype)
        if vtype == STRING:
            fld.string_lens.append(off)
            off += 8 + struct.unpack_from("<Q", data, off)[0]
        elif vtype == ARRAY:
            sub = struct.unpack_from("<I", data, off)[0]
            n = struct.unpack_from("<Q", data, off + 4)[0]
            fld.subtype, fld.n, fld.off_n = sub, n, off + 4
            off += 12
            for _ in range(n):
                if sub == STRING:
                    fld.string_lens.append(off)
                    off += 8 + struct.unpack_from("<Q", data, off)[0]
                else:
                    off += _SCALAR[sub]
        else:
            off += _SCALAR[vtype]
        fld.end = off
        fields.append(fld)
    return fields, off


def _replace_value(data: bytes, f: Field, vtype: int, payload: bytes) -> bytes:
    """The file with field f's type and value replaced (payload: the encoded value after the type)."""
    return data[:f.off_type] + struct.pack("<I", vtype) + payload + data[f.end:]


def _f32_array(values) -> bytes:
    return struct.pack("<IQ", FLOAT32, len(values)) + struct.pack(f"<{len(values)}f", *values)


def _str_array(values) -> bytes:
    out = struct.pack("<IQ", STRING, len(values))
    for v in values:
        b = v.encode()
        out += struct.pack("<Q", len(b)) + b
    return out


def _values(data: bytes, f: Field):
    """The elements of an array field (floats or strings), for variants that change a few of them."""
    if f.subtype == FLOAT32:
        return list(struct.unpack_from(f"<{f.n}f", data, f.off_n + 8))
    if f.subtype == STRING:
        out = []
        for o in f.string_lens:
            ln = struct.unpack_from("<Q", data, o)[0]
            out.append(data[o + 8:o + 8 + ln].decode(errors="replace"))
        return out
    return None


def mutants(data: bytes, *, n_flips: int = 64, seed: int = 0):
    """(name, bytes) for every mutant of a profile file."""
    fields, end_kv = parse(data)
    # truncations
    cuts = {0, 3, 4, 8, 16, 24, end_kv, len(data) - 1}
    for f in fields:
        cuts |= {f.off_keylen, f.off_keylen + 8, f.off_type, f.off_value, f.end - 1}
        if f.off_n is not None:
            cuts |= {f.off_n, f.off_n + 8}
    for c in sorted(x for x in cuts if 0 <= x < len(data)):
        yield f"truncate@{c}", data[:c]
        yield f"truncate@{c}+1", data[:c + 1]
    # huge counts
    for big in (1 << 32, 1 << 62, (1 << 64) - 1):
        for off, what in ((8, "n_tensors"), (16, "n_kv")):
            yield f"{what}={big}", data[:off] + struct.pack("<Q", big) + data[off + 8:]
        for f in fields:
            if f.off_n is not None:
                yield f"{f.key}.n={big}", data[:f.off_n] + struct.pack("<Q", big) + data[f.off_n + 8:]
            for i, o in enumerate(f.string_lens[:2]):
                yield f"{f.key}.strlen[{i}]={big}", data[:o] + struct.pack("<Q", big) + data[o + 8:]
            yield f"{f.key}.keylen={big}", data[:f.off_keylen] + struct.pack("<Q", big) + data[f.off_keylen + 8:]
    # bit flips
    rng = random.Random(seed)
    for i in range(n_flips):
        pos = rng.randrange(len(data))
        b = bytearray(data)
        b[pos] ^= 1 << rng.randrange(8)
        yield f"flip#{i}@{pos}", bytes(b)
    # hostile values for every qaq key
    for f in fields:
        if not f.key.startswith("qaq."):
            continue
        k = f.key
        yield f"{k}:as-string", _replace_value(data, f, STRING, struct.pack("<Q", 3) + b"abc")
        yield f"{k}:as-u32", _replace_value(data, f, UINT32, struct.pack("<I", 7))
        yield f"{k}:as-i32-negative", _replace_value(data, f, INT32, struct.pack("<i", -5))
        yield f"{k}:as-u32-huge", _replace_value(data, f, UINT32, struct.pack("<I", 0xFFFFFFFF))
        yield f"{k}:empty-f32-array", _replace_value(data, f, ARRAY, _f32_array([]))
        yield f"{k}:empty-str-array", _replace_value(data, f, ARRAY, _str_array([]))
        vals = _values(data, f) if f.vtype == ARRAY else None
        if f.subtype == FLOAT32 and vals:
            for bad in (float("nan"), float("inf"), 1e30, -1e30, 0.0):
                v = list(vals)
                v[len(v) // 2] = bad
                yield f"{k}:value={bad}", _replace_value(data, f, ARRAY, _f32_array(v))
            yield f"{k}:one-short", _replace_value(data, f, ARRAY, _f32_array(vals[:-1]))
            yield f"{k}:one-long", _replace_value(data, f, ARRAY, _f32_array(vals + [0.0]))
        if f.subtype == STRING and vals:
            for bad in ("i32", "q4_K", "q2_K", "tq1_0", "", "x" * (1 << 20), "f16\x00junk"):
                v = list(vals)
                v[len(v) // 2] = bad
                yield f"{k}:entry={bad[:12]!r}", _replace_value(data, f, ARRAY, _str_array(v))
            yield f"{k}:one-short", _replace_value(data, f, ARRAY, _str_array(vals[:-1]))
        if f.vtype == STRING:
            yield f"{k}:long-string", _replace_value(data, f, STRING, struct.pack("<Q", 1 << 20) + b"y" * (1 << 20))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path)
    ap.add_argument("-o", "--output-dir", type=Path, required=True)
    a = ap.parse_args()
    a.output_dir.mkdir(parents=True, exist_ok=True)
    data = a.profile.read_bytes()
    (a.output_dir / "seed.gguf").write_bytes(data)
    n = 0
    for n, (_, m) in enumerate(mutants(data), 1):
        (a.output_dir / f"mutant-{n:05d}.gguf").write_bytes(m)
    print(f"wrote {n} mutants and the seed to {a.output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
