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
  qaq-gguf demo                                   the main job on the bundled Gemma 3 270M: calibrate,
                                                  evaluate against uniform -ctk/-ctv pairs, generate
  qaq-gguf profile make MODEL -ctk q8_0 -ctv q4_0 -o qaq.gguf
                                                  a hand-made profile: every layer K q8_0, V q4_0
  qaq-gguf profile make MODEL -ctk q8_0,q4_0,... -ctv q4_0 -o qaq.gguf
                                                  one type per layer (comma-separated, one entry per layer)
  qaq-gguf profile inspect qaq.gguf --n-ctx 32768 per-layer table, average bits, bytes at a context length
  qaq-gguf profile embed MODEL qaq.gguf -o model-qaq.gguf
                                                  a model copy carrying the profile (use kv_profile="embedded")
  qaq-gguf calibrate MODEL --text calib.txt --budget 5.5 -o qaq.gguf
                                                  measure each layer's K/V sensitivity and solve the per-layer
                                                  types for an average of 5.5 bits per cached value
  qaq-gguf eval MODEL --text test.txt --profile qaq.gguf -ctk q8_0 -ctv q4_0
                                                  PPL, KL-divergence, top-1 against the f16 cache
  qaq-gguf eval MODEL --needle niah --text test.txt --profile qaq.gguf -o needle/
                                                  needle retrieval at 4k/16k/32k against the f16 cache
  qaq-gguf frontier MODEL --calib-text calib.txt --text test.txt
                                                  quality vs bits: uniform pairs and calibrated profiles (PNG)
  qaq-gguf ablate MODEL --scores qaq.gguf --text test.txt
                                                  does the error model rank layers right?
  qaq-gguf lab MODEL --calib-text calib.txt --text test.txt --methods kivi,qjl,cq,native:q4_0/q4_0 -o lab/
                                                  published KV-cache methods on your model, one harness
  qaq-gguf server -m MODEL --kv-profile qaq.gguf  the bundled llama-server (any llama-server arguments)
  qaq-gguf openai-server --model MODEL --kv_profile qaq.gguf
                                                  llama-cpp-python's OpenAI server, per-layer types in /v1/models
  qaq-gguf perplexity -m MODEL --kv-profile qaq.gguf -f text.txt
  qaq-gguf rpc-server -p 50052                    llama.cpp's RPC server with our types (--rpc host:port elsewhere)
"""


MODEL_HELP = "GGUF model, or a bundled one by name: gemma3-270m (the default), smollm2-135m"

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
    info["backends"] = native.backend_names()
    kinds = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
    for i in range(lib.ggml_backend_dev_count()):
        d = lib.ggml_backend_dev_get(i)
        dev = {"name": native.c_str(lib.ggml_backend_dev_name(d)),
               "description": native.c_str(lib.ggml_backend_dev_description(d)),
               "type": kinds.get(lib.ggml_backend_dev_type(d), "other")}
        if dev["type"] == "gpu":  # the devices a profile's K/V pairs are checked against (native/qaq-profile.cpp)
            dev["kv_cache_types"] = {str(h): _fa_types(lib, i, h) for h in INFO_HEAD_SIZES}
        info["devices"].append(dev)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k == "devices":
            print("devices:")
            for d in v:
                print(f"  {d['name']:<10} {d['type']:<5} {d['description']}")
                for h, types in d.get("kv_cache_types", {}).items():
                    print(f"  {'':<16} flash attention, head {h}, K = V: {' '.join(types) or 'none'}")
        elif k == "backends":
            print(f"backends: {', '.join(v)}")
        else:
            print(f"{k}: {v}")
    return 0


INFO_HEAD_SIZES = (64, 128, 256)


def _fa_types(lib, dev_index: int, head: int) -> list[str]:
    """The cache types device dev_index runs flash attention with (K and V of that type) at this head size."""
    from . import cachetypes

    return [t.name for t in map(cachetypes.get, cachetypes.names())
            if head % t.block_size == 0 and t.name != "f32"
            and lib.qaq_device_supports_kv_types(dev_index, t.type_id, t.type_id, head, head) == 1]


def add_info_parser(sub) -> None:
    """`qaq-gguf info`."""
    p = sub.add_parser("info", help="versions, the library in use, compiled backends and devices (and, for each GPU, "
                                   "the cache types its flash attention runs)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)


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


def _openai_server(argv: list[str]) -> int:
    from . import openai_server

    sys.argv = ["qaq-gguf openai-server", *argv]
    openai_server.main()
    return 0


def add_passthrough_parsers(sub) -> None:
    """The commands that run a bundled binary, or the OpenAI server, with every argument passed on."""
    for name, exe, what in (("server", "llama-server", "the OpenAI-compatible server and web chat"),
                            ("perplexity", "llama-perplexity", "perplexity / KL-divergence"),
                            ("bench", "llama-bench", "speed benchmark"),
                            ("fit-params", "llama-fit-params", "memory estimate / fit with the profile's types"),
                            ("rpc-server", "ggml-rpc-server", "llama.cpp's RPC server, with qaq-gguf's cache types")):
        p = sub.add_parser(name, help=f"run the bundled {exe} ({what}); all arguments are passed on",
                           add_help=False)
        p.set_defaults(func=lambda a, exe=exe: _exec_binary(exe, a.rest), rest=[])
    p = sub.add_parser("openai-server", add_help=False,
                       help="llama-cpp-python's OpenAI-compatible server (python -m llama_cpp.server) with a "
                            "kv_profile setting per model and per-layer types in /v1/models; arguments passed on")
    p.set_defaults(func=lambda a: _openai_server(a.rest), rest=[])


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


def _add_profile_make_parser(psub) -> None:
    """`qaq-gguf profile make`."""
    from . import cachetypes

    p = psub.add_parser("make", help="a profile from per-layer type lists",
                        description="Write a profile for MODEL from K and V type lists. A single type applies to "
                                    "every layer; a comma-separated list gives one type per layer. Types: "
                                    + ", ".join(cachetypes.names()) + ".")
    p.add_argument("model", help="the GGUF model the profile is for (it is bound to this file's tensor layout)")
    p.add_argument("-ctk", "--cache-type-k", dest="type_k", metavar="TYPES", required=True,
                   help="K cache type, or one per layer, comma-separated (spelled as llama.cpp's -ctk)")
    p.add_argument("-ctv", "--cache-type-v", dest="type_v", metavar="TYPES", required=True,
                   help="V cache type, or one per layer, comma-separated (spelled as llama.cpp's -ctv)")
    p.add_argument("-o", "--output", required=True, help="profile file to write (e.g. qaq.gguf)")
    p.add_argument("--n-ctx", type=int, default=4096, help="context length for the size column")
    p.set_defaults(func=cmd_profile_make)


def cmd_profile_inspect(args: argparse.Namespace) -> int:
    from . import profile

    p = profile.read_profile(args.profile)
    by_dev = None
    if args.rpc or args.n_gpu_layers is not None:
        _native()
        from . import _native as native, runtime

        model = args.model or args.profile  # a model with an embedded profile is its own model
        if not native.gguf_header(model)[1]:  # no tensors: a profile file
            raise SystemExit("qaq-gguf profile inspect: give --model MODEL for the device split (the profile is "
                             "a separate file)")
        if profile.fingerprint(model) != p.model.fingerprint:
            raise profile.ProfileError(f"{args.profile} was made for another model than {model}")
        if args.rpc:
            runtime.add_rpc_servers(args.rpc)
        devs = runtime.layer_devices(model, 999 if args.n_gpu_layers is None else args.n_gpu_layers)
        by_dev = profile.kv_bytes_by_device(p, devs, args.n_ctx)
    if args.json:
        kw = {"n_ctx": args.n_ctx}
        print(json.dumps({
            "model": p.model.__dict__, "type_k": p.type_k, "type_v": p.type_v, "provenance": p.provenance,
            "average_bits": profile.average_bits(p),
            "kv_bytes": profile.kv_bytes(p, **kw), "n_ctx": args.n_ctx,
            **({"kv_bytes_by_device": by_dev} if by_dev is not None else {})}, indent=2))
    else:
        print(profile.describe(p, n_ctx=args.n_ctx))
        if by_dev is not None:
            print(f"KV cache per device at n_ctx={args.n_ctx}: " +
                  ", ".join(f"{d} {b / 2**20:.2f} MiB" for d, b in by_dev.items()))
    return 0


def _add_profile_inspect_parser(psub) -> None:
    """`qaq-gguf profile inspect`."""
    p = psub.add_parser("inspect", help="per-layer table, average bits per value and bytes at a context length")
    p.add_argument("profile", help="a profile file, or a model with an embedded profile")
    p.add_argument("--n-ctx", type=int, default=4096, help="context length for sizes (sliding-window layers "
                                                            "hold at most their window)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--rpc", metavar="SERVERS", help="RPC servers (host:port,...) as llama.cpp's --rpc: report the "
                                                     "KV bytes on each device the layers go to")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, help="layers offloaded (default with --rpc: all)")
    p.add_argument("--model", help="the model, for the device split (default: the profile, if it is a model file)")
    p.set_defaults(func=cmd_profile_inspect)


def cmd_profile_embed(args: argparse.Namespace) -> int:
    from . import profile

    p = profile.read_profile(args.profile)
    profile.embed_profile(args.model, p, args.output)
    print(f"wrote {args.output} (use it with kv_profile=\"embedded\" or --kv-profile embedded)")
    return 0


def _add_profile_embed_parser(psub) -> None:
    """`qaq-gguf profile embed`."""
    p = psub.add_parser("embed", help="copy a model with the profile embedded")
    p.add_argument("model")
    p.add_argument("profile")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_profile_embed)


def add_profile_parser(sub) -> None:
    """`qaq-gguf profile ACTION`: make, inspect, embed (each beside its command)."""
    prof = sub.add_parser("profile", help="make, inspect and embed KV profiles",
                          description="Make, inspect and embed KV profiles (docs/profile-format.md).")
    psub = prof.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    _add_profile_make_parser(psub)
    _add_profile_inspect_parser(psub)
    _add_profile_embed_parser(psub)


DATA = Path(__file__).resolve().parent / "data"


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: calibrate the bundled model, evaluate the profiles beside uniform pairs, generate text."""
    qaq_gguf, _ = _native()
    import time

    from . import calibrate, evaluate, frontier, models, profile

    t0 = time.time()
    model = models.resolve(args.model)
    calib = args.calib_text or str(DATA / "wikitext-2-valid-sample.txt")
    held_out = args.text or str(DATA / "wikitext-2-test-sample.txt")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"1/3 calibrating {model.name} on {Path(calib).name} ({args.calib_chunks} chunks of 512 tokens)")
    scores = calibrate.calibrate(model, _read_text(calib), n_chunks=args.calib_chunks, n_threads=args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    print(f"2/3 evaluating on held-out {Path(held_out).name} against the f16 cache "
          f"({args.chunks} chunks of {args.n_ctx} tokens)")
    res = frontier.run(model, scores, evaluate.read_text_file(held_out), budgets=budgets,
                       pairs=frontier.pairs_from_arg(args.pairs), work_dir=out, n_ctx=args.n_ctx,
                       n_chunks=args.chunks, n_threads=args.threads, text_name=Path(held_out).name)
    frontier.save(res, out / "demo.json")
    print()
    print(evaluate.format_table(res))
    print()
    print(frontier.summary(res))
    best = out / f"qaq-{budgets[0]:g}bits.gguf"
    p = profile.read_profile(best)
    print(f"\n3/3 generating with {best} (K {','.join(sorted(set(p.type_k)))} / V "
          f"{','.join(sorted(set(p.type_v)))}, {profile.average_bits(p):.2f} bits per value)")
    llm = qaq_gguf.Llama(str(model), kv_profile=str(best), n_ctx=2048, verbose=False, seed=0)
    gen = llm(args.prompt, max_tokens=args.max_tokens, temperature=0.0)
    print(f"{args.prompt}{gen['choices'][0]['text']}")
    print(f"\nprofiles and results in {out}/ ({time.time() - t0:.0f} s)")
    return 0


def add_demo_parser(sub) -> None:
    """`qaq-gguf demo`."""
    p = sub.add_parser("demo", help="the main job on the bundled Gemma 3 270M: calibrate, evaluate, generate",
                       description="Calibrate the bundled Gemma 3 270M on WikiText-2 validation text, evaluate "
                                   "calibrated profiles beside uniform -ctk/-ctv pairs on held-out WikiText-2 test "
                                   "text (perplexity, KL-divergence, top-1 against the f16 cache), then generate "
                                   "text with the first profile. Samples of both texts ship with the package.")
    p.add_argument("--model", help="a GGUF model instead of the bundled one")
    p.add_argument("--calib-text", help="calibration text (default: the packaged WikiText-2 valid sample)")
    p.add_argument("--text", help="held-out evaluation text (default: the packaged WikiText-2 test sample)")
    p.add_argument("--budgets", default="5.5,4.5,3.5",
                   help="bits per value of the calibrated profiles (default 5.5,4.5,3.5)")
    p.add_argument("--pairs", default="q5_0/q5_0,q4_0/q4_0,qaq3/qaq3",
                   help="uniform K/V pairs to compare with (default q5_0/q5_0,q4_0/q4_0,qaq3/qaq3)")
    p.add_argument("--calib-chunks", type=int, default=8, help="calibration chunks of 512 tokens (default 8)")
    p.add_argument("--chunks", type=int, default=4, help="evaluation chunks (default 4)")
    p.add_argument("--n-ctx", type=int, default=1024, help="evaluation chunk length (default 1024)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("-o", "--output-dir", default="qaq-demo", help="where profiles and results go")
    p.set_defaults(func=cmd_demo)


def _configs(args: argparse.Namespace) -> list:
    from . import evaluate, frontier

    profiles = [Path(p) for p in args.profile or []]
    stems = [p.stem for p in profiles]
    cfgs = [evaluate.CacheConfig(p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}/{p.stem}", profile=str(p))
            for p in profiles]
    if args.type_k or args.type_v:
        tk, tv = args.type_k or "f16", args.type_v or "f16"
        cfgs.append(evaluate.CacheConfig(f"{tk}/{tv}", type_k=tk, type_v=tv))
    if args.pairs:
        cfgs += [evaluate.CacheConfig(f"{tk}/{tv}", type_k=tk, type_v=tv) for tk, tv in frontier.pairs_from_arg(
            args.pairs)]
    return cfgs


def cmd_eval(args: argparse.Namespace) -> int:
    _native()
    from . import evaluate, models

    model = str(models.resolve(args.model))
    cfgs = _configs(args)
    if not cfgs:
        raise SystemExit("qaq-gguf eval: nothing to evaluate: give --profile P, -ctk/-ctv, or --pairs")
    if args.needle:
        return _eval_needle(args, model, cfgs)
    if args.chat:
        return _eval_chat(args, model, cfgs)
    if not args.text:
        raise SystemExit("qaq-gguf eval: give --text FILE (held-out text to score), or --chat")
    edges = [int(x) for x in args.position_edges.split(",")] if args.position_edges else []
    res = evaluate.evaluate(model, evaluate.read_text_file(args.text), cfgs, n_ctx=args.ctx, n_batch=args.batch,
                            n_chunks=args.chunks, n_threads=args.threads, text_name=Path(args.text).name,
                            score_from=args.score_from, position_edges=edges)
    print(evaluate.format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    return 0


def _eval_chat(args: argparse.Namespace, model: str, cfgs: list) -> int:
    from . import evaluate

    res = evaluate.evaluate_chat(model, cfgs, max_tokens=args.chat_max_tokens, n_batch=args.batch,
                                 n_threads=args.threads)
    print(evaluate.format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    return 0


def _eval_needle(args: argparse.Namespace, model: str, cfgs: list) -> int:
    from . import evaluate, needle

    if args.needle == "niah" and not args.text:
        raise SystemExit("qaq-gguf eval --needle niah: give --text FILE, the haystack (e.g. WikiText-2 test)")
    res = needle.run(model, cfgs, kind=args.needle, lengths=[int(x) for x in args.needle_lengths.split(",")],
                     depths=needle.depth_grid(args.needle_depths), trials=args.needle_trials,
                     haystack=evaluate.read_text_file(args.text) if args.text and args.needle == "niah" else None,
                     n_threads=args.threads, text_name=Path(args.text).name if args.text else None)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"needle-{args.needle}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text("```\n" + needle.table(res) + "\n```\n")
    png = needle.plot(res, stem.with_suffix(".png"))
    print(needle.table(res))
    print(f"wrote {stem}.json, {stem}.md" + (f", {png}" if png else ""))
    return 0


def add_eval_parser(sub) -> None:
    """`qaq-gguf eval`."""
    ev = dict(formatter_class=argparse.RawDescriptionHelpFormatter)
    p = sub.add_parser("eval", help="perplexity, KL-divergence and top-1 against the f16 cache", **ev,
                       description="""\
Evaluate KV cache configs against the f16 cache on the same tokens, the llama-perplexity way: chunks of --ctx
tokens (the first replaced by BOS), the second half of each chunk scored, flash attention on for every config.
Reports PPL, ΔPPL against f16, mean KL-divergence (and its 99th percentile), top-1 agreement, KV bytes and
average bits per value.

examples:
  qaq-gguf eval model.gguf --text wiki.test.raw --profile qaq.gguf
  qaq-gguf eval model.gguf --text wiki.test.raw -ctk q8_0 -ctv q4_0 --profile qaq.gguf --json out.json
  qaq-gguf eval model.gguf --text wiki.test.raw --pairs q8_0/q8_0,q4_0/q4_0

long context: score one 32k chunk from position 512 on, KLD reported per position range:
  qaq-gguf eval --text wiki.test.raw --profile qaq.gguf --ctx 32768 --chunks 1 --score-from 512 \\
      --position-edges 1024,4096,8192,16384

chat (--chat): the packaged evaluation prompts answered greedily by the model on the f16 cache in its own chat
template, then every config scored teacher-forced along those answers (KLD against f16 on the answers' tokens):
  qaq-gguf eval smollm2-135m --chat --profile qaq.gguf --pairs q4_0/q4_0

needle retrieval (--needle niah|passkey): one context per length with a needle at each depth, each needle's
question answered greedily after it; the f16 cache runs first as the reference. Writes needle-KIND.json/.md/.png:
  qaq-gguf eval --needle niah --text wiki.test.raw --profile qaq.gguf --pairs q4_0/q4_0 \\
      --needle-lengths 4096,16384,32768 --needle-depths 8 -o results/""")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--text", help="held-out text (never the calibration text); the haystack for --needle niah")
    p.add_argument("--profile", action="append", help="a profile to evaluate (repeatable)")
    p.add_argument("-ctk", "--cache-type-k", dest="type_k", metavar="TYPE", help="uniform K cache type (as llama.cpp)")
    p.add_argument("-ctv", "--cache-type-v", dest="type_v", metavar="TYPE", help="uniform V cache type (as llama.cpp)")
    p.add_argument("--pairs", help="uniform pairs, e.g. q8_0/q4_0,q4_0/q4_0")
    p.add_argument("--ctx", type=int, default=1024, help="tokens per chunk (default 1024)")
    p.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--chunks", type=int, default=8, help="chunks to score (default 8)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="also write the results as JSON")
    p.add_argument("--score-from", type=int, metavar="POS", help="first scored position (default ctx/2)")
    p.add_argument("--position-edges", metavar="POS,...", help="also report KLD per position range split here")
    p.add_argument("--chat", action="store_true", help="score chats in the model's template instead of a text")
    p.add_argument("--chat-max-tokens", type=int, default=128, help="longest answer with --chat (default 128)")
    p.add_argument("--needle", choices=("niah", "passkey"), help="retrieval test instead of scoring the text")
    p.add_argument("--needle-lengths", default="4096,16384,32768", help="context lengths (default 4k,16k,32k)")
    p.add_argument("--needle-depths", type=int, default=8, help="needles per context, depths 0..100%% (default 8)")
    p.add_argument("--needle-trials", type=int, default=1, help="contexts per length (default 1)")
    p.add_argument("-o", "--output-dir", default="qaq-needle", help="where --needle writes its results")
    p.set_defaults(func=cmd_eval)


def _scores(args: argparse.Namespace, model: str):
    from . import calibrate, profile

    if args.scores:
        return calibrate.scores_from_profile(profile.read_profile(args.scores))
    if not args.calib_text:
        raise SystemExit("qaq-gguf: give --scores PROFILE (a calibrated profile) or --calib-text FILE")
    return calibrate.calibrate(model, _read_text(args.calib_text), n_chunks=args.calib_chunks, n_threads=args.threads)


def _add_scores_command(sub, name: str, helptext: str) -> argparse.ArgumentParser:
    """A command that needs per-layer scores (frontier, ablate): its parser with the options both take."""
    p = sub.add_parser(name, help=helptext, description=helptext + ". Scores come from a calibrated profile "
                       "(--scores) or a calibration run (--calib-text).")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--text", required=True, help="held-out evaluation text")
    p.add_argument("--scores", help="a calibrated profile whose stored scores to use")
    p.add_argument("--calib-text", help="calibration text (when --scores is not given)")
    p.add_argument("--calib-chunks", type=int, default=16, help="calibration chunks of 512 tokens (default 16)")
    p.add_argument("--threads", type=int)
    return p


def cmd_frontier(args: argparse.Namespace) -> int:
    _native()
    from . import evaluate, frontier, models

    model = str(models.resolve(args.model))
    scores = _scores(args, model)
    out = Path(args.output_dir)
    res = frontier.run(model, scores, evaluate.read_text_file(args.text),
                       budgets=[float(b) for b in args.budgets.split(",")], pairs=frontier.pairs_from_arg(args.pairs),
                       work_dir=out, n_ctx=args.ctx, n_chunks=args.chunks, n_threads=args.threads,
                       text_name=Path(args.text).name, compare=args.compare or [], chat=args.chat)
    frontier.save(res, out / "frontier.json")
    png = frontier.plot(res, out / "frontier.png")
    print(evaluate.format_table(res))
    print()
    print(frontier.summary(res))
    print(f"wrote {out / 'frontier.json'}, {png} and the profiles in {out}/")
    return 0


def add_frontier_parser(sub) -> None:
    """`qaq-gguf frontier`."""
    p = _add_scores_command(sub, "frontier",
                            "uniform pairs vs calibrated profiles across budgets: table, JSON, PNG")
    p.add_argument("--chat", action="store_true",
                   help="also score every config on chats in the model's own template (eval --chat): a third panel "
                        "and a second summary")
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in (8.5, 7.0, 6.5, 6.0, 5.5, 5.0, 4.5, 4.0,
                                                                       3.5, 3.0)))
    p.add_argument("--pairs", default="q8_0/q8_0,q8_0/q5_0,q8_0/q4_0,q5_1/q5_1,q5_0/q5_0,q5_0/q4_0,"
                                      "q4_1/q4_1,q4_0/q4_0,iq4_nl/iq4_nl,q4_0/qaq3,qaq3/qaq3,q4_0/qaq2,"
                                      "qaq3/qaq2")
    p.add_argument("--compare", action="append", metavar="PROFILE",
                   help="also evaluate this profile (e.g. an earlier calibration) in the same run, as the "
                        "series 'compared' (repeatable)")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("-o", "--output-dir", default="qaq-frontier")
    p.set_defaults(func=cmd_frontier)


def cmd_ablate(args: argparse.Namespace) -> int:
    _native()
    from . import ablate, models

    model = str(models.resolve(args.model))
    scores = _scores(args, model)
    out = Path(args.output_dir)
    res = ablate.run(model, scores, _read_text(args.text), type_name=args.type, work_dir=out, n_ctx=args.ctx,
                     n_chunks=args.chunks, n_threads=args.threads)
    (out / "ablate.json").write_text(json.dumps(res, indent=1))
    png = ablate.plot(res, out / "ablate.png")
    print(ablate.table(res))
    print(f"wrote {out / 'ablate.json'} and {png}")
    return 0


def add_ablate_parser(sub) -> None:
    """`qaq-gguf ablate`."""
    p = _add_scores_command(sub, "ablate",
                            "one layer's K or V quantized at a time: measured loss vs predicted score")
    p.add_argument("--type", default="q4_0", help="the type one layer is quantized to (default q4_0)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("-o", "--output-dir", default="qaq-ablate")
    p.set_defaults(func=cmd_ablate)


def cmd_lab(args: argparse.Namespace) -> int:
    _native()
    from . import evaluate, lab, models

    model = str(models.resolve(args.model))
    specs = [x for x in args.methods.split(",") if x.strip()]
    frontier = [b if b.endswith(".gguf") else float(b) for b in args.frontier.split(",")] if args.frontier else []
    res = lab.run(model, _read_text(args.calib_text), evaluate.read_text_file(args.text), specs, n_ctx=args.ctx,
                  n_chunks=args.chunks, n_batch=args.batch, calib_ctx=args.calib_ctx, calib_chunks=args.calib_chunks,
                  frontier=frontier,
                  work_dir=args.output_dir, n_threads=args.threads, text_name=Path(args.text).name,
                  calib_name=Path(args.calib_text).name)
    files = lab.save(res, args.output_dir)
    print(lab.table(res))
    print(f"\nlab run took {res['lab']['seconds']:.0f} s; wrote {', '.join(str(f) for f in files)}")
    return 0


def add_lab_parser(sub) -> None:
    """`qaq-gguf lab`."""
    from .methods import help_lines

    p = sub.add_parser("lab", help="published KV-cache methods (QAQ, AQUA-KV, QJL, CQ, KIVI, KVQuant, TurboQuant) on "
                                   "your model, through llama.cpp, beside native caches",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description="""\
Fit each method on calibration text, then run it end to end through llama.cpp: in its own context over an f16
cache, the method's reconstruction of every layer's keys and values (and queries, where it transforms them)
replaces the real ones as the graph computes them, so attention sees exactly what the method would store. All
methods, native caches and calibrated profiles are scored in one run against the f16 cache on the same tokens
(KL-divergence, PPL, top-1), each with its true bits per value (scales, norms, codebooks, outliers and windows
included). Writes lab.json, lab.md and lab.png (KLD against bits).

methods (a bare name runs its default settings, name:setting one setting):
""" + "\n".join("  " + line for line in help_lines()) + """
  native:TK/TV  native:FILE.gguf   a real llama.cpp cache: a uniform pair or a profile

examples:
  qaq-gguf lab --calib-text wiki.valid.txt --text wiki.test.raw --methods kivi,qjl:3,native:q4_0/q4_0
  qaq-gguf lab model.gguf --calib-text valid.txt --text test.txt --methods all --frontier 4.5,3.5 -o lab/""")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--calib-text", required=True, help="text the methods are fitted on (never the evaluation text)")
    p.add_argument("--text", required=True, help="held-out evaluation text")
    p.add_argument("--methods", required=True, help="comma-separated method specs (see above), or 'all'")
    p.add_argument("--frontier", help="also calibrate qaq-gguf profiles at these budgets (bits, comma-separated) "
                                      "and draw them as a line; a PROFILE.gguf item is a profile calibrated before "
                                      "(qaq-gguf calibrate, on other text than --text), drawn on the same line")
    p.add_argument("--ctx", type=int, default=1024, help="evaluation chunk length (default 1024)")
    p.add_argument("--chunks", type=int, default=4, help="evaluation chunks (default 4)")
    p.add_argument("-b", "--batch", type=int, default=64,
                   help="evaluation batch (default 64): a method's full-precision window of recent tokens is "
                        "simulated at batch granularity, so smaller batches are more faithful (and slower)")
    p.add_argument("--calib-ctx", type=int, default=512, help="calibration chunk length (default 512)")
    p.add_argument("--calib-chunks", type=int, default=8, help="calibration chunks (default 8)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all)")
    p.add_argument("-o", "--output-dir", default="qaq-lab", help="where lab.json/md/png go")
    p.set_defaults(func=cmd_lab)


def parse_size(s: str) -> int:
    """'2GiB', '512MiB', '1.5G', '300M', '123456' -> bytes (K/M/G/T are powers of 1024, as llama.cpp prints)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", s.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (examples: 2GiB, 512MiB, 1.5G, 1000000)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def _positions_arg(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of tokens: {s!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: give the longest context the profile serves, in tokens (1 or more)")
    return n


def _exact_cells_arg(s: str) -> int | None:
    if s == "auto":
        return None
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of cells or 'auto': {s!r}") from None
    if not 0 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"{n} exact cells: give 0 to 1024, or 'auto'")
    return n


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    return p.read_text(encoding="utf-8", errors="replace")


def cmd_calibrate(args: argparse.Namespace) -> int:
    _native()
    from . import calibrate, models, profile

    model = str(models.resolve(args.model))
    if args.budget is None and args.max_kv_bytes is None and not args.frontier:
        raise SystemExit("qaq-gguf calibrate: give a budget: --budget BITS, or --max-kv-bytes SIZE --n-ctx N "
                         "(or --frontier DIR)")
    if args.max_kv_bytes is not None and not args.n_ctx:
        raise SystemExit("qaq-gguf calibrate: --max-kv-bytes needs --n-ctx (the context length the cache must hold)")
    cands = [c.strip() for c in args.candidates.split(",")] if args.candidates else None
    if not args.scores and not args.text:
        raise SystemExit("qaq-gguf calibrate: give the calibration text: --text FILE (never the evaluation text)")
    if args.budget is not None or args.max_kv_bytes is not None:  # the output's folder now, not after the run
        try:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"qaq-gguf calibrate: cannot write {args.output}: {e}") from None
    if args.scores:
        scores = calibrate.scores_from_profile(profile.read_profile(args.scores))
        print(f"scores from {args.scores} (no model run)", file=sys.stderr)
    else:
        scores = calibrate.calibrate(model, _read_text(args.text), n_ctx=args.ctx, n_chunks=args.chunks,
                                     chat_chunks=args.chat_chunks, candidates=cands, method=args.method, max_queries=args.max_queries,
                                     n_threads=args.threads, center_keys=not args.no_center_keys,
                                     rebalance_keys=not args.no_rebalance_keys,
                                     center_values=not args.no_center_values, exact_first=not args.no_exact_first,
                                     exact_cells=args.exact_cells, positions=args.positions)
    if args.gains:
        scores = _measure_gains(args, model, scores)
    prov = {"tool_version": _version(), "calib_text": Path(args.text).name if args.text else ""}
    if args.frontier:
        out_dir = Path(args.frontier)
        out_dir.mkdir(parents=True, exist_ok=True)
        for p in calibrate.frontier(scores, candidates=cands, provenance=prov):
            f = out_dir / f"qaq-{profile.average_bits(p):.2f}bits.gguf"
            profile.write_profile(p, f)
            print(f"{f}  avg {profile.average_bits(p):.3f} bits  predicted error "
                  f"{p.provenance['predicted_error']:.4g}")
    if args.budget is not None or args.max_kv_bytes is not None:
        p = calibrate.allocate(scores, avg_bits=args.budget, max_kv_bytes=args.max_kv_bytes, n_ctx=args.n_ctx,
                               candidates=cands, provenance=prov)
        profile.write_profile(p, args.output)
        print(profile.describe(p, n_ctx=args.n_ctx or 4096))
        print(f"wrote {args.output}")
    return 0


def _measure_gains(args: argparse.Namespace, model: str, scores):
    """`calibrate --gains TYPE[,TYPE]`: the scores with their layers' gains measured (ablate.gains)."""
    from . import ablate

    if not args.text:
        raise SystemExit("qaq-gguf calibrate: --gains runs the model: give the calibration text (--text FILE)")
    if args.gains_chunks < 1:
        raise SystemExit(f"qaq-gguf calibrate: --gains-chunks {args.gains_chunks}: each gain needs at least one "
                         "chunk of --ctx tokens (default 4)")
    types = list(ablate.GAIN_TYPES) if args.gains == "default" else [t.strip() for t in args.gains.split(",")
                                                                     if t.strip()]
    missing = [t for t in types if t not in scores.candidates]
    if not types or missing:
        raise SystemExit(f"qaq-gguf calibrate: --gains {args.gains}: {', '.join(missing) or 'no type'} not among the "
                         f"scored candidates ({', '.join(scores.candidates)})")
    print(f"measuring each layer's gain: its K, then its V in {' and '.join(types)}, the rest f16 "
          f"({2 * len(scores.layers()) * len(types)} evaluations of {args.gains_chunks}x{args.ctx} tokens)",
          file=sys.stderr)
    return ablate.gains(model, scores, _read_text(args.text), types=types, n_ctx=args.ctx,
                        n_chunks=args.gains_chunks, n_threads=args.threads)


def add_calibrate_parser(sub) -> None:
    """`qaq-gguf calibrate`."""
    p = sub.add_parser(
        "calibrate", help="measure per-layer K/V sensitivity on text and solve the per-layer types for a budget",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Run MODEL on calibration text through llama.cpp (f16 cache, flash attention off), record each layer's queries,
keys, values and attention probabilities, score every layer's K and V under every candidate cache type with QAQ's
error model (the real quantizers, llama.cpp's Hadamard rotation included), and choose one type per layer's K and V
with the least predicted error that fits the budget (an exact multiple-choice knapsack).

budgets:
  --budget BITS           average bits per cached value over all layers' K and V, block scales included.
                          Reference points: f16 = 16, q8_0 = 8.5, q5_0 = 5.5, q4_0 = 4.5, and our
                          sub-4-bit types qaq3 = 3.5, qaq2 = 2.5.
                          --budget 6.5 is the size of -ctk q8_0 -ctv q4_0; --budget 4.5 that of q4_0/q4_0.
  --max-kv-bytes SIZE --n-ctx N
                          the whole cache at context N fits in SIZE (e.g. 24MiB, 2GiB); sliding-window layers
                          count only the cells they hold.

examples:
  qaq-gguf calibrate model.gguf --text wiki.valid.txt --budget 5.5 -o qaq.gguf
  qaq-gguf calibrate model.gguf --text wiki.valid.txt --max-kv-bytes 1GiB --n-ctx 32768 -o qaq.gguf
  qaq-gguf calibrate model.gguf --text wiki.valid.txt --frontier profiles/     one profile per 0.25 bits
  qaq-gguf calibrate model.gguf --scores qaq.gguf --budget 4.5 -o qaq45.gguf   re-solve, no model run
  qaq-gguf calibrate model.gguf --scores qaq.gguf --text wiki.valid.txt --gains --budget 3.0 -o qaq30.gguf
                                                      the solver weighs each layer by its measured gain

Never calibrate on the text you evaluate on.""")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--text", help="calibration text file (plain UTF-8)")
    p.add_argument("--budget", type=float, metavar="BITS", help="average bits per cached value")
    p.add_argument("--max-kv-bytes", type=parse_size, metavar="SIZE", help="cache size bound at --n-ctx")
    p.add_argument("--n-ctx", type=int, help="context length for --max-kv-bytes (and the printed sizes)")
    p.add_argument("-o", "--output", default="qaq.gguf", help="profile to write (default: qaq.gguf)")
    p.add_argument("--frontier", metavar="DIR", help="also write one profile per distinct allocation along the "
                                                     "predicted quality/size frontier into DIR")
    p.add_argument("--chunks", type=int, default=8, help="chunks of calibration text to run (default 8)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per calibration chunk (default 512)")
    p.add_argument("--chat-chunks", type=int, metavar="N",
                   help="chunks of chat in the model's own template scored beside the text: the packaged "
                        "calibration prompts answered by the model on the f16 cache (default: a quarter of --chunks "
                        "when the model has a chat template; 0: plain text only)")
    p.add_argument("--method", choices=("measured", "qaq"), default="measured",
                   help="measured: real quantization error through the layer's real attention (default); "
                        "qaq: QAQ's closed-form bounds")
    p.add_argument("--candidates", help="comma-separated cache types to choose from (default: f16 and every "
                                        "quantized cache type)")
    p.add_argument("--max-queries", type=int, default=128, help="query rows sampled per chunk and layer")
    _add_transform_options(p)
    p.add_argument("--threads", type=int, help="CPU threads (default: all)")
    p.add_argument("--scores", metavar="PROFILE", help="reuse the scores stored in a calibrated profile (and its "
                                                       "gains, if it has them)")
    _add_gains_options(p)
    p.set_defaults(func=cmd_calibrate)


def _add_transform_options(p: argparse.ArgumentParser) -> None:
    """`calibrate`: the K/V transforms a profile carries, its exact cells, the positions its key statistics cover."""
    p.add_argument("--no-center-keys", action="store_true",
                   help="store keys as they are; by default the profile holds each layer's mean key and the cache "
                        "stores k - mean (exact for attention, 2-5x less key error on Gemma 3); models whose "
                        "attention is not shift-invariant (soft-capping, sinks, MLA) are never centred")
    p.add_argument("--no-rebalance-keys", action="store_true",
                   help="no key scales; by default each RoPE pair of the keys is scaled by sqrt(query rms / key "
                        "rms) and the queries by its inverse (exact for attention; 2-3x less key error on Gemma 3)")
    p.add_argument("--no-center-values", action="store_true",
                   help="store values as they are; by default the cache stores v - mean and attention adds the "
                        "mean back (exact: attention weights sum to one)")
    p.add_argument("--no-exact-first", action="store_true",
                   help="let the first token be quantized like the others; by default the centring vectors put "
                        "its K and V on each layer type's grid, so the cache holds them exactly (it receives up to "
                        "half of the attention in some layers): BOS, or for a model without BOS the first token of "
                        "its chat template")
    p.add_argument("--exact-cells", type=_exact_cells_arg, default=None, metavar="N|auto",
                   help="keep the first N cells of every layer's cache exact in f16, whatever tokens they hold "
                        "(attention sinks; read by llama.cpp's CPU flash attention: a profile with them is refused "
                        "where the KV cache is on a GPU; --exact-cells 0 for a profile a GPU can run); 'auto' "
                        "(default) chooses N from the attention the first positions draw during calibration (up to "
                        "16; none for position 0 alone where the model's BOS is kept exact). Their bytes count in "
                        "the bits at a context length")
    p.add_argument("--positions", type=_positions_arg, metavar="N",
                   help="the longest context the profile serves, in tokens (default: the model's training context, "
                        "8192 for SmolLM2-135M, 32768 for Gemma 3 270M). RoPE turns each key with its position, so "
                        "the key mean and scales are measured with every chunk moved to a position spread over N "
                        "(attention is unchanged): measured on the first --ctx positions alone they fit only there "
                        "(SmolLM2-135M at 3.0 bits: KLD 0.09 at 8k tokens against 0.33; at 1k 0.11 against 0.08, so "
                        "--positions 512 for short contexts only)")


def _add_gains_options(p: argparse.ArgumentParser) -> None:
    """`calibrate --gains`: the solver's per-layer weights measured end to end (ablate.py)."""
    p.add_argument("--gains", metavar="TYPES", nargs="?", const="default",
                   help="also measure each layer's gain end to end: its K, then its V stored in each of TYPES "
                        "(comma-separated; default: ablate.GAIN_TYPES, tcq3,tcq2) with every other layer f16, "
                        "KL-divergence against f16 on the calibration text above the floor any change costs, per "
                        "unit of predicted score; the solver then weighs every layer's scores by them (their "
                        "geometric mean over the types, halfway toward each part's mean) instead of counting keys "
                        "twice. Measured against that: 0.88x / 0.95x the KLD on SmolLM2-135M at 3.0 / 2.5 bits, "
                        "0.99x / 0.95x on Gemma 3 270M (docs/benchmarks.md). 2 x layers x types short evaluations "
                        "(~18 min for SmolLM2-135M, ~11 min for Gemma 3 270M on 2 cores). With --scores: gains for "
                        "stored scores")
    p.add_argument("--gains-chunks", type=int, default=4, metavar="N",
                   help="chunks of --ctx tokens each gain is measured on (default 4)")


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: each command's options are set by the add_*_parser function beside its cmd_*."""
    ap = argparse.ArgumentParser(prog="qaq-gguf", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"qaq-gguf {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for add in (add_info_parser, add_passthrough_parsers, add_demo_parser, add_eval_parser, add_frontier_parser,
                add_ablate_parser, add_lab_parser, add_calibrate_parser, add_profile_parser):
        add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = build_parser()
    # pass-through commands: everything after the command name goes to the binary untouched
    passthrough = {"server": "llama-server", "perplexity": "llama-perplexity", "bench": "llama-bench",
                   "fit-params": "llama-fit-params", "rpc-server": "ggml-rpc-server"}
    if argv and argv[0] in passthrough:
        return _exec_binary(passthrough[argv[0]], argv[1:])
    if argv and argv[0] == "openai-server":
        return _openai_server(argv[1:])
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 1
    from .profile import ProfileError
    from ._native import LibraryError

    try:
        return args.func(args)
    except (ProfileError, LibraryError, FileNotFoundError, ImportError, ValueError) as e:
        print(f"qaq-gguf: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
