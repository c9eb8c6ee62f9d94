"""Rewrite a model's queries, keys and values inside llama.cpp, as a KV-cache method would store them.

A :class:`Rewriter` sits in one llama.cpp context's eval callback (``cb_eval``, the hook collect.py reads
activations through). When the graph has computed a layer's final ``Qcur``/``Kcur``/``Vcur`` (post-norm,
post-RoPE: what attention and the cache receive), the callback hands the tensor to a method
(``qaq_gguf.methods``), which returns its reconstruction; the rewriter writes it back into the tensor before the
rest of the graph runs. Over an f16 cache the attention then sees exactly the method's reconstruction (rounded to
f16 by the cache, like the reference), read back from the cache like any cached token.

Which of a layer's several ``Kcur-<il>`` tensors is the final one differs by architecture (llama.cpp names the
projection, the normed and the roped key alike), so :meth:`Rewriter.probe` decodes one token first and records
the order; the rewrite then acts on the last occurrence of each name.

Methods that keep a window of recent tokens in full precision (KIVI, QAQ's newest tokens, AQUA-KV) change cached
tokens after they were written: before each decode the rewriter asks the method for such updates
(``method.refresh``) and writes them into the cache cells directly. That needs cell ``t`` to hold position ``t``:
contexts with a rewriter hold one sequence, are cleared before each chunk and keep every layer's full context
(``swa_full``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from . import llama, tensors
from .tensors import read, write

_NAME = re.compile(r"^(Qcur|Kcur|Vcur)-(\d+)$")
_CACHE = re.compile(r"^cache_(?:[a-z]+_)?([kv])_l(\d+)$")
KIND = {"Qcur": "q", "Kcur": "k", "Vcur": "v"}

class RewriteError(RuntimeError):
    """The graph does not have the tensors a rewrite needs, or a method returned something unusable."""


@dataclass
class CacheUpdate:
    """New contents for cached tokens of one layer: ``values`` (len(pos), n_head_kv, head_dim) at positions pos."""

    il: int
    kind: str  # "k" or "v"
    pos: np.ndarray
    values: np.ndarray


@dataclass
class _Probe:
    final: dict[tuple[str, int], int] = field(default_factory=dict)  # (kind, il) -> occurrence of the last one
    cache: dict[tuple[str, int], int] = field(default_factory=dict)  # (kind, il) -> cache tensor pointer


class Rewriter:
    """The eval callback of one context: hands each layer's final Q/K/V to ``method.apply`` and writes the result
    back (for the kinds in ``method.rewrites``); writes ``method.refresh`` updates into the cache before a decode.

    Use: pass :attr:`callback` as the context's ``cb_eval``; call :meth:`probe` once after the context exists,
    :meth:`begin` when the cache has been cleared for a new sequence, :meth:`before_decode` before each
    ``llama_decode`` with the batch's positions."""

    def __init__(self, method):
        self.method = method
        self.lib = tensors.ggml_lib()
        self.kinds = set(getattr(method, "observes", ("q", "k", "v"))) | set(method.rewrites)
        self._probe: _Probe | None = None
        self._probing = False
        self._seen: dict[tuple[str, int], int] = {}
        self._pos: np.ndarray | None = None
        self._final: set[tuple[str, int]] = set()  # (kind, il) whose final tensor this batch has rewritten
        self._deferred_v: dict[int, int] = {}  # il -> Vcur tensor waiting for the layer's queries and keys
        self.error: BaseException | None = None
        self.callback = llama.llama_cpp_module().ggml_backend_sched_eval_callback(self._on_tensor)

    # -- the callback -------------------------------------------------------------------------------------------

    def _on_tensor(self, t, ask, user):  # noqa: ARG002 - ggml's callback signature
        try:
            name = self.lib.ggml_get_name(t).decode(errors="replace")
            if self._probing:
                return self._on_probe(t, name, ask)
            m = _NAME.match(name)
            if not m:
                return not ask
            key = (KIND[m.group(1)], int(m.group(2)))
            if key[0] not in self.kinds:
                return not ask
            if ask:
                return True
            n = self._seen.get(key, 0)
            self._seen[key] = n + 1
            if self._probe.final.get(key) != n:
                return True
            kind, il = key
            if kind == "v" and self._v_waits(il):
                self._deferred_v[il] = t  # its consumers (the cache write, attention) have not run yet
                return True
            self._rewrite(t, name, kind, il)
            self._final.add(key)
            if il in self._deferred_v and not self._v_waits(il):
                self._rewrite(self._deferred_v.pop(il), f"Vcur-{il}", "v", il)
                self._final.add(("v", il))
            return True
        except BaseException as e:  # an exception must not cross the C callback: stop the graph, re-raise later
            self.error = e
            return False

    def _v_waits(self, il: int) -> bool:
        """Whether layer il's values must wait for the batch's queries and keys: methods whose value rule needs
        this batch's attention (``values_need_attention``) on graphs that compute V first (Llama's does)."""
        if not getattr(self.method, "values_need_attention", False):
            return False
        return any((k, il) in self._probe.final and (k, il) not in self._final for k in ("q", "k") if k in self.kinds)

    def _rewrite(self, t, name: str, kind: str, il: int) -> None:
        x = read(self.lib, t)
        shape = x.shape
        x = x.reshape(shape[-3:])  # (n_tokens, n_head, head_dim)
        if self._pos is None or len(self._pos) != x.shape[0]:
            raise RewriteError(f"{name}: {x.shape[0]} tokens, but the batch has "
                               f"{0 if self._pos is None else len(self._pos)} positions")
        y = self.method.apply(il, kind, x, self._pos)
        if kind in self.method.rewrites:
            y = np.asarray(y, np.float32)
            if y.shape != x.shape or not np.all(np.isfinite(y)):
                raise RewriteError(f"{self.method.label}: {name}: the method returned "
                                   f"{'shape ' + str(y.shape) if y.shape != x.shape else 'non-finite values'}")
            write(self.lib, t, y.reshape(shape))

    def _on_probe(self, t, name: str, ask: bool) -> bool:
        m = _NAME.match(name)
        if m:
            if ask:
                return True
            key = (KIND[m.group(1)], int(m.group(2)))
            n = self._seen.get(key, 0)
            self._seen[key] = n + 1
            self._probe.final[key] = n
            return True
        # the cache tensors: base tensors of the views attention reads and set_rows writes
        view_src = tensors.Tensor.from_address(t).view_src
        if view_src:
            c = _CACHE.match(self.lib.ggml_get_name(view_src).decode(errors="replace"))
            if c:
                self._probe.cache[(c.group(1), int(c.group(2)))] = int(view_src)
        return not ask

    # -- driving it ----------------------------------------------------------------------------------------------

    def probe(self, ctx, token: int) -> None:
        """Decode one token to learn the graph's tensor order and the cache tensors, then clear the cache."""
        lc = llama.llama_cpp_module()
        batch = lc.llama_batch_init(1, 0, 1)
        try:
            batch.n_tokens = 1
            batch.token[0] = token
            batch.pos[0] = 0
            batch.n_seq_id[0] = 1
            batch.seq_id[0][0] = 0
            batch.logits[0] = True
            self._probe, self._probing, self._seen = _Probe(), True, {}
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            rc = lc.llama_decode(ctx, batch)
            self._probing = False
            self.raise_error()
            if rc != 0:
                raise RewriteError(f"the probe decode failed ({rc})")
        finally:
            self._probing = False
            lc.llama_batch_free(batch)
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        missing = sorted({k for k in self.method.rewrites} - {k for k, _ in self._probe.final})
        if missing:
            raise RewriteError(f"this model's graph names no {', '.join(missing)} tensors "
                               "(Qcur-<il>/Kcur-<il>/Vcur-<il>): the lab supports llama.cpp's standard attention graph")

    def layers(self) -> list[int]:
        return sorted({il for _, il in self._probe.final})

    def begin(self, n_ctx: int) -> None:
        """A new sequence starts at position 0 on a cleared cache."""
        self.method.begin(n_ctx)

    def before_decode(self, pos: np.ndarray) -> None:
        """The next decode holds these positions; write the method's cache updates first."""
        self._pos = np.asarray(pos, dtype=np.int64)
        self._seen = {}
        if self._deferred_v:
            raise RewriteError(f"layers {sorted(self._deferred_v)}: values waited for queries and keys that the "
                               "graph never computed")
        self._final = set()
        refresh = getattr(self.method, "refresh", None)
        if refresh is None:
            return
        for u in refresh(int(self._pos[0])):
            self._write_cells(u)

    def _write_cells(self, u: CacheUpdate) -> None:
        ptr = self._probe.cache.get((u.kind, u.il))
        if ptr is None:
            raise RewriteError(f"layer {u.il} has no {u.kind.upper()} cache tensor to update")
        dtype, ne, nb = tensors.layout(ptr)
        if dtype != np.float16:
            raise RewriteError("cache updates need an f16 cache")
        vals = np.asarray(u.values, np.float32).reshape(len(u.pos), -1).astype(np.float16)
        if vals.shape[1] != ne[0] or np.any(u.pos < 0) or np.any(u.pos >= ne[1]):
            raise RewriteError(f"cache update of layer {u.il}: rows of {vals.shape[1]} values at positions up to "
                               f"{int(u.pos.max()) if len(u.pos) else 0} for a cache of {ne[1]} cells of {ne[0]}")
        for p, row in zip(u.pos.tolist(), vals):
            self.lib.ggml_backend_tensor_set(ptr, row.ctypes.data, p * nb[1], row.nbytes)

    def raise_error(self) -> None:
        """Re-raise an exception the callback caught (the decode stopped because of it)."""
        if self.error is not None:
            e, self.error = self.error, None
            raise e
