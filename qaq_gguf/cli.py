"""The `qaq-gguf` command line: `qaq-gguf COMMAND --help` explains each command."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DESCRIPTION = """\
qaq-gguf gives a GGUF model a mixed-precision KV cache: each layer's K and V cache gets its own type, chosen by a
profile (a small GGUF file of metadata) that is bound to the model it was made for.

examples:
  qaq-gguf info                                   versions, library, backends and devices
  qaq-gguf demo                                   run the bundled Gemma 3 270M with a mixed K/V profile
  qaq-gguf profile make MODEL -k q8_0 -v q4_0 -o qaq.gguf
                                                  a hand-made profile: every layer K q8_0, V q4_0
  qaq-gguf profile make MODEL -k q8_0,q4_0,... -v q4_0 -o qaq.gguf
                                                  one type per layer (comma-separated, one entry per layer)
  qaq-gguf profile inspect qaq.gguf --n-ctx 32768 per-layer table, average bits, bytes at a context length
  qaq-gguf profile embed MODEL qaq.gguf -o model-qaq.gguf
                                                  a model copy carrying the profile (use kv_profile="embedded")
  qaq-gguf server -m MODEL --kv-profile qaq.gguf  the bundled llama-server (any llama-server arguments)
  qaq-gguf perplexity -m MODEL --kv-profile qaq.gguf -f text.txt
"""


def _native():
    import qaq_gguf  # binds llama-cpp-python to our library
    from qaq_gguf import _native

    return qaq_gguf, _native


def cmd_info(args: argparse.Namespace) -> int:
    qaq_gguf, native = _native()
    ffi, lib = native.ffi_lib()
    import llama_cpp

    info = {
        "qaq_gguf": qaq_gguf.__version__,
        "native_qaq_version": native.c_str(lib.qaq_version()),
        "llama_cpp_commit": native.c_str(lib.qaq_llama_commit()),
        "llama_cpp_python": llama_cpp.__version__,
        "library": str(native.lib_dir() / native._lib_file_name()),
        "binaries": str(native.bin_dir()),
        "backends": [], "devices": [],
    }
    llama_cpp.llama_backend_init()
    for i in range(lib.ggml_backend_reg_count()):
        info["backends"].append(native.c_str(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i))))
    kinds = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
    for i in range(lib.ggml_backend_dev_count()):
        d = lib.ggml_backend_dev_get(i)
        info["devices"].append({"name": native.c_str(lib.ggml_backend_dev_name(d)),
                                "description": native.c_str(lib.ggml_backend_dev_description(d)),
                                "type": kinds.get(lib.ggml_backend_dev_type(d), "other")})
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k == "devices":
            print("devices:")
            for d in v:
                print(f"  {d['name']:<10} {d['type']:<5} {d['description']}")
        elif k == "backends":
            print(f"backends: {', '.join(v)}")
        else:
            print(f"{k}: {v}")
    return 0


def _exec_binary(name: str, argv: list[str]) -> int:
    _, native = _native()
    exe = native.bin_dir() / name
    if not exe.is_file():
        print(f"qaq-gguf: {exe} is missing: reinstall qaq-gguf (its build produces {name})", file=sys.stderr)
        return 2
    if argv[:1] == ["--"]:
        argv = argv[1:]
    os.execv(str(exe), [str(exe), *argv])
    return 0  # not reached


def _parse_types(s: str, n: int) -> list[str] | str:
    parts = [p.strip() for p in s.split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) != n:
        raise SystemExit(f"qaq-gguf: {len(parts)} types given, but the model has {n} layers (give one type, or one "
                         "per layer)")
    return parts


def cmd_profile_make(args: argparse.Namespace) -> int:
    _native()
    from . import profile

    ident = profile.model_identity(args.model)
    p = profile.make_profile(ident, _parse_types(args.type_k, ident.n_layer), _parse_types(args.type_v, ident.n_layer),
                             {"method": "manual", "tool_version": _version()})
    profile.write_profile(p, args.output)
    print(profile.describe(p, n_ctx=args.n_ctx))
    print(f"wrote {args.output}")
    return 0


def cmd_profile_inspect(args: argparse.Namespace) -> int:
    from . import profile

    p = profile.read_profile(args.profile)
    if args.json:
        kw = {"n_ctx": args.n_ctx}
        print(json.dumps({
            "model": p.model.__dict__, "type_k": p.type_k, "type_v": p.type_v, "provenance": p.provenance,
            "average_bits": profile.average_bits(p), "average_bits_at_n_ctx": profile.average_bits(p, **kw),
            "kv_bytes": profile.kv_bytes(p, **kw), "n_ctx": args.n_ctx}, indent=2))
    else:
        print(profile.describe(p, n_ctx=args.n_ctx))
    return 0


def cmd_profile_embed(args: argparse.Namespace) -> int:
    from . import profile

    p = profile.read_profile(args.profile)
    profile.embed_profile(args.model, p, args.output)
    print(f"wrote {args.output} (use it with kv_profile=\"embedded\" or --kv-profile embedded)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    qaq_gguf, _ = _native()
    from . import models, profile

    model = Path(args.model) if args.model else models.gemma3_270m()
    ident = profile.model_identity(model)
    # until calibration chooses the map: keys of global layers and the first layer in q8_0, the rest q4_0;
    # values in q4_0 (the QAQ finding: keys are the sensitive side)
    tk = ["q8_0" if (not ident.is_swa[il] or il == 0) else "q4_0" for il in range(ident.n_layer)]
    p = profile.make_profile(ident, tk, "q4_0", {"method": "demo"})
    out = Path(args.output)
    profile.write_profile(p, out)
    print(profile.describe(p, n_ctx=args.n_ctx))
    llm = qaq_gguf.Llama(str(model), kv_profile=str(out), n_ctx=args.n_ctx, verbose=False, seed=0)
    info = llm.kv_layer_info()
    print(f"\nallocated: {sum(r['bytes_k'] + r['bytes_v'] for r in info) / 2**20:.2f} MiB in "
          f"{len({(r['type_k'], r['type_v']) for r in info})} K/V type pairs")
    res = llm(args.prompt, max_tokens=args.max_tokens, temperature=0.0)
    print(f"\n{args.prompt}{res['choices'][0]['text']}")
    return 0


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qaq-gguf", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"qaq-gguf {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="versions, the library in use, compiled backends and devices")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    for name, exe, what in (("server", "llama-server", "the OpenAI-compatible server and web chat"),
                            ("perplexity", "llama-perplexity", "perplexity / KL-divergence"),
                            ("bench", "llama-bench", "speed benchmark")):
        p = sub.add_parser(name, help=f"run the bundled {exe} ({what}); all arguments are passed on",
                           add_help=False)
        p.set_defaults(func=lambda a, exe=exe: _exec_binary(exe, a.rest), rest=[])

    p = sub.add_parser("demo", help="run the bundled Gemma 3 270M with a mixed per-layer K/V profile")
    p.add_argument("--model", help="a GGUF model instead of the bundled one")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("-o", "--output", default="qaq-demo.gguf", help="where to write the demo profile")
    p.set_defaults(func=cmd_demo)

    prof = sub.add_parser("profile", help="make, inspect and embed KV profiles",
                          description="Make, inspect and embed KV profiles (docs/profile-format.md).")
    psub = prof.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    p = psub.add_parser("make", help="a profile from per-layer type lists",
                        description="Write a profile for MODEL from K and V type lists. A single type applies to "
                                    "every layer; a comma-separated list gives one type per layer. Types: f16, "
                                    "bf16, f32, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl.")
    p.add_argument("model", help="the GGUF model the profile is for (it is bound to this file's tensor layout)")
    p.add_argument("-k", "--type-k", required=True, help="K cache type(s)")
    p.add_argument("-v", "--type-v", required=True, help="V cache type(s)")
    p.add_argument("-o", "--output", required=True, help="profile file to write (e.g. qaq.gguf)")
    p.add_argument("--n-ctx", type=int, default=4096, help="context length for the size column")
    p.set_defaults(func=cmd_profile_make)
    p = psub.add_parser("inspect", help="per-layer table, average bits per value and bytes at a context length")
    p.add_argument("profile", help="a profile file, or a model with an embedded profile")
    p.add_argument("--n-ctx", type=int, default=4096, help="context length for sizes (sliding-window layers "
                                                            "hold at most their window)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile_inspect)
    p = psub.add_parser("embed", help="copy a model with the profile embedded")
    p.add_argument("model")
    p.add_argument("profile")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_profile_embed)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = build_parser()
    # pass-through commands: everything after the command name goes to the binary untouched
    if argv and argv[0] in ("server", "perplexity", "bench"):
        return _exec_binary({"server": "llama-server", "perplexity": "llama-perplexity",
                             "bench": "llama-bench"}[argv[0]], argv[1:])
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 1
    from .profile import ProfileError
    from ._native import LibraryError

    try:
        return args.func(args)
    except (ProfileError, LibraryError, FileNotFoundError, ImportError) as e:
        print(f"qaq-gguf: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
