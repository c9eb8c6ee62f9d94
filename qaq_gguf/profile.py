"""The qaq KV profile: per-layer K/V cache types as GGUF metadata (docs/profile-format.md).

A profile is a GGUF file holding metadata only, or the same keys embedded into a copy of the model. It is bound to
one model file by the model's architecture, per-layer K/V shapes and a fingerprint of its tensor layout; the native
loader (`qaq_model_apply_kv_profile`, used by Python and llama-server alike) refuses it for any other model.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from . import cachetypes
from .errors import ProfileError  # noqa: F401 - profile.ProfileError, the name callers use

SCHEMA_VERSION = 3  # the newest version written and read; a profile is written with the oldest that holds it
PROFILE_TYPE = "qaq-profile"
NO_KV = "none"  # type name of a layer that has no KV cache of its own


@dataclass
class ModelIdentity:
    """What binds a profile to one model file."""
    architecture: str
    n_layer: int
    n_head_kv: list[int]
    head_dim_k: list[int]
    head_dim_v: list[int]
    is_swa: list[bool]
    n_swa: int
    fingerprint: str
    name: str = ""
    # RoPE layout (what pairs of dimensions rotate together), read from the model, not stored in profiles:
    # rope_neox pairs (i, i + n_rot/2), else (2i, 2i + 1); None: no RoPE / unknown (a profile's identity)
    rope_neox: bool | None = field(default=None, compare=False)
    n_rot: int = field(default=0, compare=False)

    def has_kv(self, il: int) -> bool:
        return self.head_dim_k[il] > 0

    def n_embd_k(self, il: int) -> int:
        """Values of one cell of layer il's K cache (n_head_kv * head_dim_k; 0 without a cache)."""
        return self.n_head_kv[il] * self.head_dim_k[il]

    def n_embd_v(self, il: int) -> int:
        """Values of one cell of layer il's V cache (n_head_kv * head_dim_v; 0 without a cache)."""
        return self.n_head_kv[il] * self.head_dim_v[il]

    def n_key_mean(self) -> int:
        """Length of a profile's k_mean and k_scale: every layer's n_embd_k, layer after layer."""
        return sum(self.n_embd_k(il) for il in range(self.n_layer))

    def n_value_mean(self) -> int:
        """Length of a profile's v_mean: every layer's n_embd_v, layer after layer."""
        return sum(self.n_embd_v(il) for il in range(self.n_layer))


@dataclass
class Profile:
    model: ModelIdentity
    type_k: list[str]
    type_v: list[str]
    provenance: dict = field(default_factory=dict)
    # per-layer sensitivity statistics: candidates, and score_k/score_v of shape (n_layer, n_candidates)
    candidates: list[str] = field(default_factory=list)
    score_k: np.ndarray | None = None
    score_v: np.ndarray | None = None
    # per-layer measured gains (n_layer each; ablate.gains): the solver's weight on each layer's K / V scores
    gain_k: np.ndarray | None = None
    gain_v: np.ndarray | None = None
    # K/V transforms (transforms.py), flat, layer after layer (n_head_kv * head_dim values per layer): keys stored
    # centred (k_mean), rebalanced keys (k_scale: K stored times it, Q read divided by it), centred values (v_mean)
    k_mean: np.ndarray | None = None
    k_scale: np.ndarray | None = None
    v_mean: np.ndarray | None = None
    # the first KV cells of every layer kept exact in f16 beside the cache's types (attention sinks, whatever tokens
    # they hold; qaq.kv.exact_cells, schema 3); 0: none
    exact_cells: int = 0

    # calibration statistics the transforms are made from (qaq.stats.<name>, flat like k_mean): k_mean, v_mean (plain
    # means), k_first, v_first (the first token's K and V); a re-solve for other types recomputes the transforms
    stats: dict = field(default_factory=dict)

    def schema_version(self) -> int:
        """The oldest schema that holds this profile: 3 with exact cells, 2 with key scales or value means, else 1."""
        if self.exact_cells:
            return 3
        return 2 if self.k_scale is not None or self.v_mean is not None else 1


# --- model identity -------------------------------------------------------------------------------------------

def fingerprint_text(model_path: str | Path) -> str:
    """The canonical text whose sha256 is the model fingerprint (native/qaq-fingerprint.cpp builds the same)."""
    try:
        reader = GGUFReader(str(model_path))
    except Exception as e:  # gguf-py raises several types for bad files
        raise ProfileError(f"cannot read {model_path}: not a GGUF file, truncated, or unreadable ({e})") from e
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else ""
    name_field = reader.fields.get("general.name")
    name = name_field.contents() if name_field is not None else ""
    lines = ["qaq-fingerprint-1", f"arch={arch}", f"name={name}"]
    for t in reader.tensors:
        ne = [int(x) for x in t.shape] + [1] * (4 - len(t.shape))
        lines.append(f"{t.name}\t{int(t.tensor_type)}\t{'x'.join(str(x) for x in ne[:4])}")
    return "\n".join(lines) + "\n"


def fingerprint(model_path: str | Path) -> str:
    """sha256 of the model's architecture, name and tensor layout (names, types, shapes; other metadata left out),
    computed by the native library (``qaq_model_fingerprint``; :func:`fingerprint_text` is the same text in
    Python)."""
    from . import _native

    ffi, lib = _native.ffi_lib()
    out = ffi.new(f"char[{65}]")
    err = ffi.new("char[512]")
    if lib.qaq_model_fingerprint(str(model_path).encode(), out, err, len(err)) != 0:
        raise ProfileError(ffi.string(err).decode(errors="replace"))
    return ffi.string(out).decode()


def centring_blocked(model_path: str | Path) -> str | None:
    """Why this model's keys cannot be stored centred (its attention is not invariant to a constant logit shift),
    or None. Mirrors llama_model_set_kv_layer_k_mean's check, from the GGUF metadata alone."""
    from . import _native

    try:
        meta, tensors = _native.gguf_header(model_path)
    except ValueError as e:
        raise ProfileError(str(e)) from e
    arch = meta.get("general.architecture", "")
    if float(meta.get(f"{arch}.attn_logit_softcapping", 0) or 0) != 0:
        return "the model soft-caps attention logits"
    if f"{arch}.attention.kv_lora_rank" in meta:
        return "the model uses MLA"
    if any(".attn_sinks" in t for t in tensors):
        return "the model has attention sinks"
    return None


def model_identity(model_path: str | Path) -> ModelIdentity:
    """Read a model's per-layer K/V shapes through llama.cpp itself (vocabulary-only load: fast)."""
    from . import llama

    with llama.vocab_only_model(model_path) as (model, _, _):
        ident = loaded_model_identity(model)
    ident.fingerprint = fingerprint(model_path)
    return ident


def loaded_model_identity(model) -> ModelIdentity:
    """The identity of a model llama.cpp has loaded (cffi pointer): every shape fact model_identity reads, the
    fingerprint left empty (it is the file's: model_identity computes it)."""
    from . import _native, llama

    ffi, lib = _native.ffi_lib()
    n = lib.llama_model_n_layer_kv(model)
    heads, hk, hv, swa = [], [], [], []
    for il in range(n):
        p = ffi.new("int32_t[3]")
        s = ffi.new("bool *")
        if lib.llama_model_layer_kv_shape(model, il, p, p + 1, p + 2, s):
            heads.append(p[0]); hk.append(p[1]); hv.append(p[2]); swa.append(bool(s[0]))
        else:
            heads.append(0); hk.append(0); hv.append(0); swa.append(False)
    arch = llama.model_meta(model, "general.architecture")
    name = llama.model_meta(model, "general.name")
    lc = llama.llama_cpp_module()
    n_swa = lc.llama_model_n_swa(llama.as_ctypes_model(model))
    rope_type = lc.llama_model_rope_type(llama.as_ctypes_model(model))
    n_rot = llama.model_meta(model, f"{arch}.rope.dimension_count")
    neox = None if rope_type == lc.LLAMA_ROPE_TYPE_NONE else rope_type != lc.LLAMA_ROPE_TYPE_NORM
    return ModelIdentity(arch, n, heads, hk, hv, swa, int(n_swa), "", name, neox,
                         int(n_rot) if n_rot else max(hk, default=0))


# --- sizes ---------------------------------------------------------------------------------------------------

def layer_cells(ident: ModelIdentity, il: int, n_ctx: int, n_ubatch: int = 512, swa_full: bool = False,
                n_seq: int = 1) -> int:
    """KV cells layer il holds at context n_ctx (llama.cpp's iSWA rule: a window-sized ring for SWA layers)."""
    if ident.is_swa[il] and not swa_full and ident.n_swa > 0:
        return min(n_ctx, _pad(ident.n_swa * n_seq + n_ubatch, 256))
    return n_ctx


def _pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


def layer_values(ident: ModelIdentity, il: int, n_ctx: int, **kw) -> tuple[int, int]:
    """Number of cached K and V values of layer il at context n_ctx."""
    if not ident.has_kv(il):
        return 0, 0
    cells = layer_cells(ident, il, n_ctx, **kw)
    return (cells * ident.n_head_kv[il] * ident.head_dim_k[il], cells * ident.n_head_kv[il] * ident.head_dim_v[il])


def average_bits(profile: Profile) -> float:
    """Bits per cached value: every layer's K and V (block scales included), each layer weighted by the values it
    stores per token. The one bits figure of a profile, whatever the context: a profile is named, calibrated, listed
    and evaluated by it (the bytes at a context length, where sliding-window layers hold fewer cells, are
    kv_bytes)."""
    tot_bits = tot_vals = 0.0
    for il in range(profile.model.n_layer):
        if not profile.model.has_kv(il):
            continue
        nk = profile.model.n_head_kv[il] * profile.model.head_dim_k[il]
        nv = profile.model.n_head_kv[il] * profile.model.head_dim_v[il]
        tot_bits += nk * cachetypes.bits(profile.type_k[il]) + nv * cachetypes.bits(profile.type_v[il])
        tot_vals += nk + nv
    return tot_bits / tot_vals if tot_vals else 0.0


def _layer_bytes(profile: Profile, il: int, n_ctx: int, **kw) -> int:
    """Bytes of layer il's K/V cache at context n_ctx: its rows, and the f16 rows of its exact cells (plus the scratch
    row llama.cpp keeps beside them)."""
    nk, nv = layer_values(profile.model, il, n_ctx, **kw)
    b = cachetypes.row_bytes(profile.type_k[il], nk) + cachetypes.row_bytes(profile.type_v[il], nv)
    if profile.exact_cells:
        rows = min(profile.exact_cells, layer_cells(profile.model, il, n_ctx, **kw)) + 1
        b += 2 * rows * (profile.model.n_embd_k(il) + profile.model.n_embd_v(il))
    return b


def kv_bytes_by_device(profile: Profile, devices: Sequence[str], n_ctx: int, **kw) -> dict[str, int]:
    """Bytes of the K/V cache at context n_ctx on each device, given each layer's device (runtime.layer_devices)."""
    out: dict[str, int] = {}
    for il in range(profile.model.n_layer):
        if profile.model.has_kv(il):
            out[devices[il]] = out.get(devices[il], 0) + _layer_bytes(profile, il, n_ctx, **kw)
    return out


def exact_cells_bits(ident: ModelIdentity, exact_cells: int, n_ctx: int, **kw) -> float:
    """What exact cells add to the bits per value at context n_ctx (bits_at with them less bits_at without)."""
    if not exact_cells:
        return 0.0
    p = make_profile(ident, "f16", "f16")
    plain = bits_at(p, n_ctx, **kw)
    p.exact_cells = exact_cells
    return bits_at(p, n_ctx, **kw) - plain


def bits_at(profile: Profile, n_ctx: int, **kw) -> float:
    """Bits per cached value at context n_ctx with everything counted: block scales, and the exact cells' f16 rows
    (which cost the most at short contexts). Without exact cells, average_bits (sliding-window layers aside)."""
    total = values = 0
    for il in range(profile.model.n_layer):
        if profile.model.has_kv(il):
            total += _layer_bytes(profile, il, n_ctx, **kw)
            values += sum(layer_values(profile.model, il, n_ctx, **kw))
    return 8.0 * total / values if values else 0.0


def kv_bytes(profile: Profile, n_ctx: int, **kw) -> int:
    """Bytes of the whole K/V cache at context n_ctx."""
    return sum(_layer_bytes(profile, il, n_ctx, **kw) for il in range(profile.model.n_layer)
               if profile.model.has_kv(il))


# --- making and checking -------------------------------------------------------------------------------------

def make_profile(ident: ModelIdentity, type_k: list[str] | str, type_v: list[str] | str,
                 provenance: dict | None = None) -> Profile:
    """A profile from per-layer type lists (or one type for every layer). Checks names and block sizes."""
    n = ident.n_layer
    tk = [type_k] * n if isinstance(type_k, str) else list(type_k)
    tv = [type_v] * n if isinstance(type_v, str) else list(type_v)
    if len(tk) != n or len(tv) != n:
        raise ProfileError(f"the model has {n} layers, but {len(tk)} K types and {len(tv)} V types were given")
    for il in range(n):
        if not ident.has_kv(il):
            tk[il] = tv[il] = NO_KV
            continue
        for what, name, head in (("K", tk[il], ident.head_dim_k[il]), ("V", tv[il], ident.head_dim_v[il])):
            try:
                ct = cachetypes.get(name)
            except ValueError as e:
                raise ProfileError(f"layer {il}: {what}: {e}") from None
            if head % ct.block_size:
                raise ProfileError(f"layer {il}: {what} cache type {name} has blocks of {ct.block_size} values, "
                                   f"which do not divide the head size {head}")
    prov = {"tool": "qaq-gguf", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    prov.update(provenance or {})
    return Profile(ident, tk, tv, prov)


def needs_flash_attn(profile: Profile) -> bool:
    """llama.cpp stores a quantized V cache only with flash attention, which also reads the exact cells."""
    return profile.exact_cells > 0 or any(t in cachetypes.TYPES and cachetypes.TYPES[t].is_quantized
                                          for t in profile.type_v)


# --- GGUF I/O --------------------------------------------------------------------------------------------------

def _add_keys(w: GGUFWriter, p: Profile) -> None:
    m = p.model
    w.add_uint32("qaq.schema_version", p.schema_version())
    w.add_string("qaq.model.architecture", m.architecture)
    w.add_string("qaq.model.name", m.name)
    w.add_uint32("qaq.model.n_layer", m.n_layer)
    w.add_array("qaq.model.n_head_kv", [int(x) for x in m.n_head_kv])
    w.add_array("qaq.model.head_dim_k", [int(x) for x in m.head_dim_k])
    w.add_array("qaq.model.head_dim_v", [int(x) for x in m.head_dim_v])
    w.add_array("qaq.model.is_swa", [bool(x) for x in m.is_swa])
    w.add_uint32("qaq.model.n_swa", m.n_swa)
    w.add_string("qaq.model.fingerprint", m.fingerprint)
    w.add_array("qaq.kv.type_k", list(p.type_k))
    w.add_array("qaq.kv.type_v", list(p.type_v))
    for key, arr, n in (("k_mean", p.k_mean, m.n_key_mean()), ("k_scale", p.k_scale, m.n_key_mean()),
                        ("v_mean", p.v_mean, m.n_value_mean())):
        if arr is None:
            continue
        if len(arr) != n:
            raise ProfileError(f"{key} has {len(arr)} values, the model's {'values' if key == 'v_mean' else 'keys'} {n}")
        w.add_array(f"qaq.kv.{key}", [float(x) for x in np.asarray(arr, np.float32)])
    if p.exact_cells:
        if not 1 <= p.exact_cells <= EXACT_CELLS_MAX:
            raise ProfileError(f"exact_cells is {p.exact_cells}, outside [1, {EXACT_CELLS_MAX}]")
        w.add_uint32("qaq.kv.exact_cells", int(p.exact_cells))
    for k, v in p.provenance.items():
        key = f"qaq.provenance.{k}"
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            w.add_string(key, json.dumps(v))
        elif isinstance(v, int):
            w.add_uint64(key, v) if v >= 0 else w.add_int64(key, v)
        elif isinstance(v, float):
            w.add_float64(key, v)
        else:
            w.add_string(key, v)
    for key, arr in p.stats.items():
        n = m.n_value_mean() if key.startswith("v_") else m.n_key_mean()
        if len(arr) != n:
            raise ProfileError(f"stats {key} has {len(arr)} values, expected {n}")
        w.add_array(f"qaq.stats.{key}", [float(x) for x in np.asarray(arr, np.float32)])
    if p.candidates and p.score_k is not None and p.score_v is not None:
        w.add_array("qaq.stats.candidates", list(p.candidates))
        w.add_array("qaq.stats.score_k", [float(x) for x in np.asarray(p.score_k, np.float32).ravel()])
        w.add_array("qaq.stats.score_v", [float(x) for x in np.asarray(p.score_v, np.float32).ravel()])
        if p.gain_k is not None and p.gain_v is not None:
            w.add_array("qaq.stats.gain_k", [float(x) for x in np.asarray(p.gain_k, np.float32)])
            w.add_array("qaq.stats.gain_v", [float(x) for x in np.asarray(p.gain_v, np.float32)])


def write_profile(p: Profile, path: str | Path) -> Path:
    """Write a metadata-only profile GGUF (its folder made if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    w = GGUFWriter(str(tmp), arch=PROFILE_TYPE)  # arch only names general.architecture
    w.add_type(PROFILE_TYPE)
    w.add_name(f"qaq KV profile for {p.model.name or p.model.architecture}")
    _add_keys(w, p)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


# the limits native/qaq-profile-check.h documents (the C validator refuses the same)
MEAN_LIMIT = 65504.0            # |qaq.kv.k_mean|, |qaq.kv.v_mean|: the cache stores x - mean
SCALE_LIMITS = (1.0 / 256, 256.0)  # qaq.kv.k_scale
EXACT_CELLS_MAX = 1024          # qaq.kv.exact_cells (LLAMA_KV_EXACT_CELLS_MAX)
_KNOWN_KEYS = {
    "qaq.schema_version", "qaq.model.architecture", "qaq.model.name", "qaq.model.n_layer", "qaq.model.n_head_kv",
    "qaq.model.head_dim_k", "qaq.model.head_dim_v", "qaq.model.is_swa", "qaq.model.n_swa", "qaq.model.fingerprint",
    "qaq.kv.type_k", "qaq.kv.type_v", "qaq.kv.k_mean", "qaq.kv.k_scale", "qaq.kv.v_mean", "qaq.kv.exact_cells",
    "qaq.stats.candidates",
    "qaq.stats.score_k", "qaq.stats.score_v", "qaq.stats.k_mean", "qaq.stats.v_mean", "qaq.stats.k_first",
    "qaq.stats.v_first", "qaq.stats.gain_k", "qaq.stats.gain_v",
}
GAIN_LIMIT = 1e6                # qaq.stats.gain_k / gain_v (one per layer): [0, GAIN_LIMIT]
_INT_TYPES = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
              GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64}


def _clip(v: str) -> str:
    """A string read from a profile, for a message: at most 48 characters (as the native validator's clip)."""
    out = "".join("?" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in v[:48])
    return f"'{out}...' ({len(v.encode())} bytes)" if len(v) > 48 else f"'{out}'"


class _Fields:
    """Typed access to a profile's keys (as _native.gguf_read returns them): every value is checked for its GGUF
    type (and arrays for their length) before it is used, and every failure names the file and the key."""

    def __init__(self, meta: dict, path):
        self.meta, self.path = meta, path

    def __contains__(self, key: str) -> bool:
        return key in self.meta

    def _get(self, key: str, required: bool):
        f = self.meta.get(key)
        if f is None and required:
            raise ProfileError(f"{self.path}: missing key {key} (a truncated or hand-edited profile?)")
        return f

    def _bad(self, key: str, what: str):
        return ProfileError(f"{self.path}: key {key} must be {what}")

    def scalar(self, key: str, kind: str, required: bool = True):
        f = self._get(key, required)
        if f is None:
            return None
        t, _, v = f
        if kind == "int" and t in _INT_TYPES:
            if int(v) < 0:
                raise ProfileError(f"{self.path}: key {key} is negative ({v})")
            return int(v)
        if kind == "str" and t == GGUFValueType.STRING:
            return str(v)
        raise self._bad(key, {"int": "an unsigned integer", "str": "a string"}[kind])

    def array(self, key: str, kind: str, n: int | None, required: bool = True, what: str = "one per layer"):
        f = self._get(key, required)
        if f is None:
            return None
        t, sub, v = f
        ok = {"int": sub in _INT_TYPES or sub == GGUFValueType.BOOL, "str": sub == GGUFValueType.STRING,
              "f32": sub == GGUFValueType.FLOAT32}[kind]
        if t != GGUFValueType.ARRAY or not ok or v is None:
            raise self._bad(key, {"int": "an array of integers", "str": "an array of strings",
                                  "f32": "an array of float32"}[kind])
        if n is not None and len(v) != n:
            raise ProfileError(f"{self.path}: key {key} has {len(v)} entries, expected {n} ({what})")
        return v

    def floats(self, key: str, n: int, lo: float = -np.inf, hi: float = np.inf, limit: str = "",
               what: str = "n_head_kv * head_dim summed over layers") -> np.ndarray | None:
        v = self.array(key, "f32", n, required=False, what=what)
        if v is None:
            return None
        arr = np.asarray(v, np.float32)
        bad = np.flatnonzero(~np.isfinite(arr))
        if len(bad):
            raise ProfileError(f"{self.path}: key {key} holds a non-finite value at {bad[0]} (a corrupt profile?)")
        out = np.flatnonzero((arr < lo) | (arr > hi))
        if len(out):
            raise ProfileError(f"{self.path}: key {key} holds {arr[out[0]]:g} at {out[0]}, outside {limit}")
        return arr


def read_profile(path: str | Path) -> Profile:
    """Read a profile file, or the profile embedded in a model file, with the checks the C validator
    (native/qaq-profile-check.cpp) makes of the profile itself: it refuses whatever that would (the model-specific
    checks run when a profile is applied). Unknown qaq.* keys are warned about."""
    from . import _native

    try:
        meta, _ = _native.gguf_read(path)  # ggml's C parser: bounded by the file's size whatever it claims
    except ValueError as e:
        raise ProfileError(str(e)) from e
    if "qaq.schema_version" not in meta:
        raise ProfileError(f"{path} is a GGUF file but holds no qaq KV profile (no qaq.schema_version key)")
    fl = _Fields(meta, path)
    schema = fl.scalar("qaq.schema_version", "int")
    if not 1 <= schema <= SCHEMA_VERSION:
        raise ProfileError(f"{path}: profile schema version {schema}, this qaq-gguf reads versions 1 to "
                           f"{SCHEMA_VERSION}: upgrade qaq-gguf or recalibrate")
    ident = _read_identity(fl)
    tk, tv = _read_types(fl, ident)
    p = Profile(ident, tk, tv, _read_provenance(meta, path))
    _read_transforms(fl, p, schema)
    _read_scores(fl, p)
    return p


def _read_identity(fl: _Fields) -> ModelIdentity:
    """The qaq.model.* keys: the model a profile is bound to."""
    path = fl.path
    n = fl.scalar("qaq.model.n_layer", "int")
    if n > 100000:
        raise ProfileError(f"{path}: qaq.model.n_layer is {n}: not a real model's layer count")
    ident = ModelIdentity(
        architecture=fl.scalar("qaq.model.architecture", "str"),
        n_layer=n,
        n_head_kv=[int(x) for x in fl.array("qaq.model.n_head_kv", "int", n)],
        head_dim_k=[int(x) for x in fl.array("qaq.model.head_dim_k", "int", n)],
        head_dim_v=[int(x) for x in fl.array("qaq.model.head_dim_v", "int", n)],
        is_swa=[bool(x) for x in fl.array("qaq.model.is_swa", "int", n)],
        n_swa=fl.scalar("qaq.model.n_swa", "int"),
        fingerprint=fl.scalar("qaq.model.fingerprint", "str"),
        name=fl.scalar("qaq.model.name", "str", required=False) or "",
    )
    for key, arr in (("n_head_kv", ident.n_head_kv), ("head_dim_k", ident.head_dim_k),
                     ("head_dim_v", ident.head_dim_v)):
        if any(x < 0 or x > 1 << 20 for x in arr):
            raise ProfileError(f"{path}: qaq.model.{key} holds an impossible value")
    return ident


def _read_types(fl: _Fields, ident: ModelIdentity) -> tuple[list[str], list[str]]:
    """qaq.kv.type_k/type_v: a known cache type per layer with a cache, whose blocks divide its head size."""
    path, n = fl.path, ident.n_layer
    tk = [str(x) for x in fl.array("qaq.kv.type_k", "str", n)]
    tv = [str(x) for x in fl.array("qaq.kv.type_v", "str", n)]
    for il in range(n):
        if not ident.has_kv(il):
            continue
        for what, name, head in (("K", tk[il], ident.head_dim_k[il]), ("V", tv[il], ident.head_dim_v[il])):
            ct = cachetypes.TYPES.get(name)
            if ct is None:
                raise ProfileError(f"{path}: layer {il}: {_clip(name)} is not a KV cache type ({what} cache; the "
                                   f"cache types are: {', '.join(cachetypes.names())})")
            if head % ct.block_size:
                raise ProfileError(f"{path}: layer {il}: {what} cache type {name} has blocks of {ct.block_size} "
                                   f"values, which do not divide this layer's head size {head}")
    return tk, tv


def _read_provenance(meta: dict, path) -> dict:
    """qaq.provenance.* (JSON-encoded values decoded); other unknown qaq.* keys are warned about (the warning
    points at read_profile's caller)."""
    prov = {}
    for key, (_, _, v) in meta.items():
        if key.startswith("qaq.provenance."):
            v = v.tolist() if isinstance(v, np.ndarray) else v
            if isinstance(v, str) and (v[:1] in ("[", "{") or v in ("true", "false", "null")):
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            prov[key[len("qaq.provenance."):]] = v
        elif key.startswith("qaq.") and key not in _KNOWN_KEYS:
            import warnings

            warnings.warn(f"{path}: unknown key {_clip(key)} ignored (made by a newer qaq-gguf?)", stacklevel=3)
    return prov


def _read_transforms(fl: _Fields, p: Profile, schema: int) -> None:
    """The K/V transforms (qaq.kv.k_mean, k_scale, v_mean: schema 2) within their limits, and the calibration
    statistics they are made from (qaq.stats.k_mean, ...)."""
    nk, nv = p.model.n_key_mean(), p.model.n_value_mean()
    if schema < 2 and ("qaq.kv.k_scale" in fl or "qaq.kv.v_mean" in fl):
        raise ProfileError(f"{fl.path}: qaq.kv.k_scale / qaq.kv.v_mean need schema version 2, the profile says 1 "
                           "(a hand-edited profile?)")
    mean_limit = f"[-{MEAN_LIMIT:g}, {MEAN_LIMIT:g}] (the cache stores x - mean)"
    p.k_mean = fl.floats("qaq.kv.k_mean", nk, -MEAN_LIMIT, MEAN_LIMIT, mean_limit)
    p.k_scale = fl.floats("qaq.kv.k_scale", nk, *SCALE_LIMITS, "[1/256, 256]")
    p.v_mean = fl.floats("qaq.kv.v_mean", nv, -MEAN_LIMIT, MEAN_LIMIT, mean_limit)
    if "qaq.kv.exact_cells" in fl:
        if schema < 3:
            raise ProfileError(f"{fl.path}: qaq.kv.exact_cells needs schema version 3, the profile says {schema} "
                               "(a hand-edited profile?)")
        n = fl.scalar("qaq.kv.exact_cells", "int")
        if not 1 <= n <= EXACT_CELLS_MAX:
            raise ProfileError(f"{fl.path}: qaq.kv.exact_cells is {n}, outside [1, {EXACT_CELLS_MAX}]")
        p.exact_cells = n
    for key, n_want in (("k_mean", nk), ("v_mean", nv), ("k_first", nk), ("v_first", nv)):
        arr = fl.floats(f"qaq.stats.{key}", n_want)
        if arr is not None:
            p.stats[key] = arr


def _read_scores(fl: _Fields, p: Profile) -> None:
    """The per-layer sensitivity scores calibration stored: candidates, score_k and score_v (n_layer x
    candidates), all three or none."""
    path, n = fl.path, p.model.n_layer
    cands = fl.array("qaq.stats.candidates", "str", None, required=False)
    if cands:
        p.candidates = [str(c) for c in cands]
        unknown = [c for c in p.candidates if c not in cachetypes.TYPES]
        if unknown:
            raise ProfileError(f"{path}: qaq.stats.candidates names unknown cache types: "
                               f"{', '.join(_clip(c) for c in unknown[:5])}")
        n_s = n * len(p.candidates)
        for key in ("score_k", "score_v"):
            arr = fl.floats(f"qaq.stats.{key}", n_s, what="layers x candidates")
            if arr is None:
                raise ProfileError(f"{path}: missing key qaq.stats.{key} (qaq.stats.candidates is present)")
            setattr(p, key, arr.reshape(n, len(p.candidates)))
    gains = [fl.floats(f"qaq.stats.{key}", n, 0.0, GAIN_LIMIT, f"[0, {GAIN_LIMIT:g}]", what="one per layer")
             for key in ("gain_k", "gain_v")]
    if any(g is not None for g in gains):
        if any(g is None for g in gains) or not cands:
            raise ProfileError(f"{path}: qaq.stats.gain_k and gain_v come together and with the scores "
                               "(qaq.stats.candidates): recalibrate, or remove both")
        p.gain_k, p.gain_v = gains


def embed_profile(model_path: str | Path, profile: Profile, out_path: str | Path) -> Path:
    """Write a copy of the model GGUF with the profile's keys added (any earlier qaq.* keys are replaced)."""
    model_path, out_path = Path(model_path), Path(out_path)
    if out_path.resolve() == model_path.resolve():
        raise ProfileError("embed writes a copy: give an output path different from the model")
    fp = fingerprint(model_path)
    if fp != profile.model.fingerprint:
        raise ProfileError(f"the profile was made for a model with fingerprint {profile.model.fingerprint[:12]}, "
                           f"but {model_path} has {fp[:12]}")
    r = GGUFReader(str(model_path))
    arch = r.fields["general.architecture"].contents()
    tmp = out_path.with_name(out_path.name + ".tmp")
    w = GGUFWriter(str(tmp), arch=arch, endianess=r.endianess)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key.startswith("qaq.") or key == "general.architecture":
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = f.types[-1] if len(f.types) > 1 else None
            w.add_key_value(key, f.contents(), vtype, sub_type=sub)
        else:
            w.add_key_value(key, f.contents(), vtype)
    _add_keys(w, profile)
    for t in r.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        w.write_tensor_data(t.data)
    w.close()
    tmp.replace(out_path)
    return out_path


# --- reading it as a person ----------------------------------------------------------------------------------

def describe(p: Profile, n_ctx: int = 4096, **kw) -> str:
    """The per-layer table `qaq-gguf profile inspect` prints."""
    m = p.model
    lines = [f"model: {m.name or '?'} ({m.architecture}, {m.n_layer} layers, fingerprint {m.fingerprint[:12]})"]
    for k in ("method", "budget", "text_sha256", "n_ctx", "tool_version", "created"):
        if k in p.provenance:
            lines.append(f"{k}: {p.provenance[k]}")
    has_scores = p.score_k is not None and p.candidates
    hdr = f"{'layer':>5} {'swa':>3} {'heads':>5} {'K type':>7} {'V type':>7} {'cells':>7} {'KiB':>9}"
    if has_scores:
        hdr += f" {'K score':>9} {'V score':>9}"
    lines.append(hdr)
    for il in range(m.n_layer):
        nk, nv = layer_values(m, il, n_ctx, **kw)
        kib = (cachetypes.row_bytes(p.type_k[il], nk) + cachetypes.row_bytes(p.type_v[il], nv)) / 1024 \
            if m.has_kv(il) else 0.0
        row = (f"{il:>5} {'y' if m.is_swa[il] else '':>3} {m.n_head_kv[il]:>5} {p.type_k[il]:>7} {p.type_v[il]:>7} "
               f"{layer_cells(m, il, n_ctx, **kw) if m.has_kv(il) else 0:>7} {kib:>9.1f}")
        if has_scores:
            sk = _score_of(p, p.score_k, il, p.type_k[il])
            sv = _score_of(p, p.score_v, il, p.type_v[il])
            row += f" {sk:>9.2e} {sv:>9.2e}"
        lines.append(row)
    total = kv_bytes(p, n_ctx, **kw)
    lines.append(f"bits per value: {average_bits(p):.3f}")
    if p.exact_cells:
        lines.append(f"exact cells: the first {p.exact_cells} of every layer in f16: {bits_at(p, n_ctx, **kw):.3f} bits "
                     f"per value at n_ctx={n_ctx}, {bits_at(p, 32768, **kw):.3f} at 32768")
    lines.append(f"KV cache at n_ctx={n_ctx}: {total / 2**20:.2f} MiB")
    done = [what + _in_layers(p, arr, neutral, size) for what, arr, neutral, size in (
        ("keys centred", p.k_mean, 0.0, m.n_embd_k), ("keys rebalanced", p.k_scale, 1.0, m.n_embd_k),
        ("values centred", p.v_mean, 0.0, m.n_embd_v)) if arr is not None]
    lines.append("K/V transforms: " + (", ".join(done) if done else "none (keys and values stored as they are)"))
    if (keys := _key_positions(p)) is not None:
        covered, spread = keys
        lines.append(f"key statistics: over positions up to {covered}" if spread else
                     f"key statistics: from the first {covered} positions only (calibrated before qaq-gguf "
                     "measured them over the context: they may not hold further into a context, calibrate again)")
    if has_scores:
        gain = p.provenance.get("calib_gain_type")
        weight = p.provenance.get("key_weight")
        lines.append(f"solver weights: each layer's measured gain (ablations in {gain})" if p.gain_k is not None
                     else f"solver weights: keys' scores x {weight:g}" if isinstance(weight, (int, float))
                     else "solver weights: not recorded")
    return "\n".join(lines)


def _key_positions(p: Profile) -> tuple[int, bool] | None:
    """(the positions a calibrated profile's key statistics (mean, scales) were measured over, whether calibration
    spread its chunks over them: ``calib_positions``, else the first ``calib_n_ctx``); None without key statistics."""
    if p.k_mean is None and p.k_scale is None:
        return None
    pos, n_ctx = p.provenance.get("calib_positions"), p.provenance.get("calib_n_ctx")
    return (pos, True) if isinstance(pos, int) else (n_ctx, False) if isinstance(n_ctx, int) else None


def key_positions_note(p: Profile, n_ctx: int | None) -> str | None:
    """A line for a profile whose key statistics (mean, scales) were measured on fewer positions than a context of
    ``n_ctx`` reaches (0 or None: the model's training context, unknown here: any profile without them counts),
    where they may cost quality (calibrate.py, "positions"); None when they cover it or the profile has none."""
    keys = _key_positions(p)
    if keys is None or (n_ctx and n_ctx <= keys[0]) or (not n_ctx and keys[1]):
        return None
    return (f"the profile's key mean and scales were measured over positions up to {keys[0]}; further into a "
            "context they may cost quality (SmolLM2's 3.0-bit profile measured on 512 positions: KLD 0.08 at 1k "
            f"tokens, 0.33 at 8k): calibrate with --positions {n_ctx or 'N'} for contexts that long")


def _in_layers(p: Profile, arr: np.ndarray, neutral: float, size) -> str:
    """' (in N of M layers)' where some layers' part of a transform vector is neutral (calibration keeps a transform
    only where it pays, per layer); '' where every layer has it."""
    layers = [il for il in range(p.model.n_layer) if p.model.has_kv(il)]
    offs = np.cumsum([0] + [size(il) for il in range(p.model.n_layer)])
    on = [il for il in layers if not np.all(np.asarray(arr[offs[il]:offs[il + 1]]) == neutral)]
    return "" if len(on) == len(layers) else f" (in {len(on)} of {len(layers)} layers)"


def _score_of(p: Profile, scores, il: int, t: str) -> float:
    return float(scores[il, p.candidates.index(t)]) if t in p.candidates else math.nan

