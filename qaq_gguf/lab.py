"""The method lab: published KV-cache methods run on the user's own GGUF model, through llama.cpp, on one harness.

    res = run("model.gguf", calib_text, eval_text, ["kivi", "qjl:3", "native:q4_0/q4_0"], frontier=[4.5, 3.5])
    print(table(res)); plot(res, "lab.png")

Each method (``qaq_gguf.methods``) is fitted on activations of the calibration text (:func:`collect_calibration`:
llama.cpp's own Q/K/V and attention, through the eval callback) and then evaluated end to end: in its own
llama.cpp context over an f16 cache, its reconstruction of each layer's keys and values (and queries, where the
method transforms them) replaces the real ones as the graph computes them (``qaq_gguf.rewrite``), so attention
sees exactly what the method would store. Every method, the native caches (``native:q4_0/q4_0``,
``native:PROFILE.gguf``) and the calibrated frontier are scored in one ``evaluate()`` run against the same f16
reference on the same tokens: KL-divergence first, PPL and top-1 beside it.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import calibrate, collect, evaluate, methods, profile, rope
from .progress import progress_bar
from .methods import Calibration, CalibLayer, MethodError


# --- calibration activations ----------------------------------------------------------------------------------

def _layer_stats(act: collect.LayerActivations, s: float) -> dict[str, np.ndarray]:
    """Per-chunk statistics of one layer (see CalibLayer): query energy, sensitivity weights, attention received."""
    q, k, v, attn = act.q, act.k, act.v, act.attn
    n, n_head, d = q.shape
    hkv = k.shape[1]
    group = n_head // hkv
    q_sq = np.zeros((hkv, d), np.float64)
    k_w = np.zeros((n, hkv, d), np.float64)
    v_w = np.zeros((n, hkv), np.float64)
    recv = np.zeros((n, hkv), np.float64)
    last = np.zeros((n, hkv), np.float32)
    seen = np.maximum((attn > 0).sum(axis=1), 1)  # (n_head, n_kv): queries that see each token
    vn = np.sum(v.astype(np.float64) ** 2, axis=-1)  # (n_kv, hkv)
    for h in range(n_head):
        g = h // group
        sh = attn[h].astype(np.float64)           # (n_q, n_kv)
        xh = sh @ v[:, g, :].astype(np.float64)   # attention output (n_q, dv)
        qs = (s * q[:, h, :]).astype(np.float64)  # the query as the logit sees it
        q_sq[g] += np.mean(qs ** 2, axis=0) / group
        # d X_i / d k_td = s S_it (v_t - X_i) q_id: squared sensitivity summed over queries
        spread = vn[None, :, g] - 2.0 * (xh @ v[:, g, :].astype(np.float64).T) + np.sum(xh ** 2, axis=1)[:, None]
        a = sh ** 2 * np.maximum(spread, 0.0)
        k_w[:, g, :] += a.T @ (qs ** 2)
        v_w[:, g] += np.sum(sh ** 2, axis=0)       # d X_i / d v_t = S_it
        recv[:, g] += sh.sum(axis=0) / seen[h] / group
        last[:, g] = np.maximum(last[:, g], attn[h][-methods.ATTN_LAST:].max(axis=0))
    qn = np.sum((s * q.astype(np.float64)) ** 2, axis=-1)  # (n, n_head)
    return {"q_sq": q_sq, "k_weight": k_w.astype(np.float32), "v_weight": v_w.astype(np.float32),
            "attn_recv": recv.astype(np.float32), "attn_last": last, "q_norm2": qn.astype(np.float32)}


def collect_calibration(model_path: str | Path, text: str, *, n_ctx: int = 512, n_chunks: int = 8,
                        n_threads: int | None = None, progress: bool = True) -> Calibration:
    """Run the model on calibration text (collect.py: f16 cache, flash attention off) and keep what methods fit
    on: every layer's keys and values, query statistics and first-order sensitivity weights (CalibLayer)."""
    ident = profile.model_identity(model_path)
    layers = [il for il in range(ident.n_layer) if ident.has_kv(il)]
    parts: dict[int, dict[str, list]] = {il: {} for il in layers}
    scales: dict[int, list[float]] = {il: [] for il in layers}
    bar = progress_bar(progress, n_chunks, "lab: calibration activations")
    done = 0
    try:
        for chunk in collect.iter_chunks(model_path, text, n_ctx=n_ctx, n_chunks=n_chunks, layers=layers,
                                         n_threads=n_threads):
            for il, act in chunk.items():
                s = collect.estimate_kq_scale(act)
                scales[il].append(s)
                st = _layer_stats(act, s)
                st.update(k=act.k.astype(np.float32), v=act.v.astype(np.float32),
                          pos=np.arange(act.k.shape[0], dtype=np.int64))
                for key, val in st.items():
                    parts[il].setdefault(key, []).append(val)
            done += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    try:
        ropes = rope.rope_params(model_path, ident, layers)
    except rope.RopeError:
        ropes = {}  # methods that quantize before RoPE refuse this model
    out = {}
    for il in layers:
        p = parts[il]
        rp = ropes.get(il)
        out[il] = CalibLayer(
            k=np.concatenate(p["k"]), v=np.concatenate(p["v"]), pos=np.concatenate(p["pos"]),
            q_sq=(np.mean(p["q_sq"], axis=0)).astype(np.float32), q_norm2=np.concatenate(p["q_norm2"]),
            k_weight=np.concatenate(p["k_weight"]), v_weight=np.concatenate(p["v_weight"]),
            attn_recv=np.concatenate(p["attn_recv"]), attn_last=np.concatenate(p["attn_last"]),
            kq_scale=float(np.mean(scales[il])),
            n_head=int(p["q_norm2"][0].shape[1]), rope=rp)
    return Calibration(ident, out, n_ctx, done, hashlib.sha256(text.encode()).hexdigest(),
                       {"n_ctx": n_ctx, "n_chunks": done})


# --- specs ----------------------------------------------------------------------------------------------------

def parse_specs(specs: Sequence[str]) -> tuple[list, list[evaluate.CacheConfig]]:
    """Methods and native configs for ``--methods`` items: ``name``, ``name:setting``, ``native:TK/TV``,
    ``native:PROFILE.gguf``, ``all`` (every published method at its default settings)."""
    meths, natives = [], []
    expanded = []
    for spec in specs:
        expanded += list(methods.PUBLISHED) if spec.strip() == "all" else [spec]
    for spec in expanded:
        spec = spec.strip()
        if not spec:
            continue
        name, _, setting = spec.partition(":")
        if name == "native":
            if not setting:
                raise MethodError("native needs a cache: native:q4_0/q4_0 or native:PROFILE.gguf")
            if setting.endswith(".gguf"):
                if not Path(setting).is_file():
                    raise FileNotFoundError(f"profile not found: {setting}")
                natives.append(evaluate.CacheConfig(f"native:{Path(setting).stem}", profile=setting))
            else:
                tk, _, tv = setting.partition("/")
                tv = tv or tk
                natives.append(evaluate.CacheConfig(f"native:{tk}/{tv}", type_k=tk, type_v=tv))
            continue
        meths += methods.make(spec)
    labels = [m.label for m in meths] + [c.label for c in natives]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise MethodError(f"methods given twice: {', '.join(dup)}")
    return meths, natives


# --- the run --------------------------------------------------------------------------------------------------

def _values_per_token(ident: profile.ModelIdentity) -> tuple[int, int]:
    nk = sum(ident.n_head_kv[il] * ident.head_dim_k[il] for il in range(ident.n_layer) if ident.has_kv(il))
    nv = sum(ident.n_head_kv[il] * ident.head_dim_v[il] for il in range(ident.n_layer) if ident.has_kv(il))
    return nk, nv


def run(model_path: str | Path, calib_text: str, text: str, specs: Sequence[str], *, n_ctx: int = 1024,
        n_chunks: int | None = 4, n_batch: int = 64, calib_ctx: int = 512, calib_chunks: int = 8,
        frontier: Sequence[float | str] = (), work_dir: str | Path | None = None, n_threads: int | None = None,
        progress: bool = True, text_name: str | None = None, calib_name: str | None = None) -> dict:
    """Fit every method of ``specs`` on ``calib_text``, then evaluate them, the native configs and (with
    ``frontier``) calibrated profiles at those budgets (or given as profile files, already calibrated on other text),
    in one run on ``text``. Returns a JSON-serialisable dict
    with evaluate()'s settings and reference, and one row per config (method, setting, paper, bits, KLD, ...)."""
    if hashlib.sha256(calib_text.encode()).digest() == hashlib.sha256(text.encode()).digest():
        raise ValueError("the calibration text is the evaluation text: fit methods on other text")
    t0 = time.time()
    meths, natives = parse_specs(specs)
    ident = profile.model_identity(model_path)
    calib = None
    fit_seconds = {}
    if meths:
        calib = collect_calibration(model_path, calib_text, n_ctx=calib_ctx, n_chunks=calib_chunks,
                                    n_threads=n_threads, progress=progress)
        for m in meths:
            t = time.time()
            if progress:
                print(f"lab: fitting {m.label}", flush=True)
            m.fit(calib)
            methods.check_fitted(m, ident)
            fit_seconds[m.label] = round(time.time() - t, 2)
    frontier_rows = []
    budgets = [b for b in frontier if not isinstance(b, str)]
    for f in (f for f in frontier if isinstance(f, str)):  # profiles calibrated beforehand: checked when loaded
        natives.append(evaluate.CacheConfig(f"calibrated:{Path(f).stem}", profile=str(f)))
        frontier_rows.append(natives[-1].label)
    if budgets:
        work = Path(work_dir or "qaq-lab")
        work.mkdir(parents=True, exist_ok=True)
        scores = calibrate.calibrate(model_path, calib_text, n_ctx=calib_ctx, n_chunks=calib_chunks,
                                     n_threads=n_threads, progress=progress)
        for b in budgets:
            p = calibrate.allocate(scores, avg_bits=b)
            f = profile.write_profile(p, work / f"qaq-{b:g}bits.gguf")
            natives.append(evaluate.CacheConfig(f"calibrated@{b:g}", profile=str(f)))
            frontier_rows.append(natives[-1].label)
    configs = natives + [evaluate.CacheConfig(m.label, method=m) for m in meths]
    res = evaluate.evaluate(model_path, text, configs, n_ctx=n_ctx, n_batch=n_batch, n_chunks=n_chunks,
                            n_threads=n_threads, progress=progress, text_name=text_name, swa_full=True)
    nk, nv = _values_per_token(ident)
    by_label = {m.label: m for m in meths}
    for r in res["results"]:
        m = by_label.get(r["label"])
        if m is None:
            r.update(family="frontier" if r["label"] in frontier_rows else "native", paper="qaq-gguf / llama.cpp",
                     bits_k=None, bits_v=None, bits_detail="as allocated")
            continue
        b = m.bits(n_ctx)
        r.update(family=m.name, paper=m.paper, bits_k=b.k, bits_v=b.v, avg_bits=b.average(nk, nv),
                 bits_detail=b.detail, fit_seconds=fit_seconds.get(m.label), headline=getattr(m, "headline", ""))
        report = getattr(m, "fit_report", None)  # a method's own fit diagnostics, where it keeps any
        if report:
            r["fit_report"] = report
        for key in ("type_k", "type_v", "kv_bytes", "n_cells"):
            r.pop(key, None)  # the f16 cache the rewrite runs over, not the method's storage
    res["lab"] = {"calib_text": calib_name, "calib_ctx": calib_ctx, "calib_chunks": calib.n_chunks if calib else 0,
                  "calib_text_sha256": hashlib.sha256(calib_text.encode()).hexdigest(),
                  "seconds": round(time.time() - t0, 1), "specs": list(specs), "frontier": list(frontier)}
    return res


# --- output ---------------------------------------------------------------------------------------------------

def table(res: dict) -> str:
    """A Markdown table: one row per config, KLD first."""
    s = res["settings"]
    lines = [f"{s.get('text') or 'text'}: {s['n_chunks']}×{s['n_ctx']} tokens, {s['n_tokens_scored']} scored, "
             f"reference f16 PPL {res['reference']['ppl']:.4f}", "",
             "| config | family | bits/value | KLD | ΔPPL % | top-1 % | bits accounting |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted(res["results"], key=lambda r: (-r["avg_bits"], r["label"])):
        lines.append(f"| {r['label']} | {r.get('family', '')} | {r['avg_bits']:.3f} | {r['kld']:.5f} ± "
                     f"{r['kld_err']:.5f} | {r['dppl_pct']:+.2f} | {r['top1']:.2f} | {r.get('bits_detail', '')} |")
    papers = {r["family"]: (r["paper"], r.get("headline", "")) for r in res["results"] if r.get("headline")}
    if papers:
        lines += ["", "| method | paper | the paper's own headline (its models, its protocol) |", "| --- | --- | --- |"]
        lines += [f"| {f} | {p} | {h} |" for f, (p, h) in sorted(papers.items())]
    return "\n".join(lines)


def plot(res: dict, path: str | Path) -> Path:
    """KLD against average bits: one marker per method and setting, the calibrated frontier as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    rows = res["results"]
    fam = sorted({r.get("family", "") for r in rows} - {"frontier"})
    markers = "os^vD<>pPX*hH"
    for i, f in enumerate(fam):
        rr = [r for r in rows if r.get("family") == f]
        ax.scatter([r["avg_bits"] for r in rr], [max(r["kld"], 1e-6) for r in rr], marker=markers[i % len(markers)],
                   label=f, s=36)
        for r in rr:
            ax.annotate(r["label"].split(":", 1)[-1] if f != "native" else r["label"], (r["avg_bits"],
                        max(r["kld"], 1e-6)), fontsize=6, xytext=(3, 2), textcoords="offset points")
    fr = sorted((r for r in rows if r.get("family") == "frontier"), key=lambda r: r["avg_bits"])
    if fr:
        ax.plot([r["avg_bits"] for r in fr], [r["kld"] for r in fr], "-s", color="tab:red", lw=2,
                label="qaq-gguf calibrated profiles")
    ax.set_yscale("log")
    ax.set_xlabel("average bits per cached value (K and V, all side information)")
    ax.set_ylabel("KL-divergence vs f16 cache (log)")
    s = res["settings"]
    ax.set_title(f"{Path(s.get('model', 'model')).name}: {s['n_chunks']}×{s['n_ctx']} tokens of "
                 f"{s.get('text') or 'text'}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def save(res: dict, out_dir: str | Path) -> list[Path]:
    """lab.json, lab.md and lab.png in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lab.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "lab.md").write_text(table(res) + "\n")
    return [out / "lab.json", out / "lab.md", plot(res, out / "lab.png")]
