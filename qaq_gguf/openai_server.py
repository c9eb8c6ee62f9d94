"""llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`) with KV profiles.

    python -m qaq_gguf.openai_server --model model.gguf --kv_profile qaq.gguf --n_ctx 8192
    qaq-gguf openai-server --config_file models.json     # each model entry may carry "kv_profile"

Plain `python -m llama_cpp.server` already runs a model's embedded profile (or the one QAQ_KV_PROFILE names): our
libllama applies it on load. This wrapper is the same server (its own code, flags and config file) with two
additions: a `kv_profile` setting per model (a profile file, "embedded", "none", or "auto", the default: whatever
the model file carries), checked like `Llama(kv_profile=...)` so that a profile made for another model is refused
by name; and, in `GET /v1/models`, a `kv_cache` object per loaded model with the per-layer types as llama-server's
`/props` reports them: {"profile", "bytes", "avg_bits", "layers": [{"layer", "type_k", "type_v", "bytes_k",
"bytes_v", "n_cells"}]}. flash_attn defaults to on where the profile stores V quantized (llama-cpp-python's server
turns it off by default, which such a cache cannot run with).
"""
from __future__ import annotations

import os
import threading
from typing import Optional

from . import _native  # noqa: F401 - binds llama_cpp to our library before the server imports it
from . import evaluate, llama, runtime

_swap_lock = threading.Lock()


def _settings_classes():
    from pydantic import Field
    from llama_cpp.server import settings as s

    class ModelSettings(s.ModelSettings):
        kv_profile: Optional[str] = Field(
            default=None, description="qaq-gguf KV profile: a profile .gguf, 'embedded' (the model file's own, "
            "required), 'none' (not even an embedded one) or 'auto' (default: what the model file carries)")
        flash_attn: Optional[bool] = Field(
            default=None, description="Whether to use flash attention (default: on where the KV profile stores "
            "V quantized, else off).")

    class Settings(s.ServerSettings, ModelSettings):
        pass

    class ConfigFileSettings(s.ServerSettings):
        models: list[ModelSettings] = Field(default=[], description="Model configs")

    return ModelSettings, Settings, ConfigFileSettings


def _load_with_profile(load):
    """LlamaProxy.load_llama_from_model_settings, building qaq_gguf.Llama with the model's kv_profile."""
    import llama_cpp

    def load_llama_from_model_settings(settings):
        choice = getattr(settings, "kv_profile", None) or runtime.AUTO
        kv_profile = None if choice == "none" else choice
        plain = llama_cpp.Llama

        def make(*args, **kwargs):
            return runtime.Llama(*args, kv_profile=kv_profile, **kwargs)

        make.from_pretrained = plain.from_pretrained
        with _swap_lock:
            llama_cpp.Llama = make  # read by llama_cpp.server.model at call time
            try:
                llm = load(settings)
            finally:
                llama_cpp.Llama = plain
        llm.qaq_kv_profile = _profile_source(llm, choice)
        return llm

    return staticmethod(load_llama_from_model_settings)


def _profile_source(llm, choice: str) -> str:
    """What set the cache types: a profile path, 'embedded', 'none', or '' (plain f16 or -ctk/-ctv)."""
    if choice not in (runtime.AUTO, "none"):
        return choice
    if choice == "none":
        return "none"
    env = os.environ.get("QAQ_KV_PROFILE", "")
    if env and env != "none":
        return env
    if env != "none" and llama.model_meta(llama.as_cffi(llm.model), "qaq.schema_version"):
        return "embedded"
    return ""


def kv_cache(llm) -> dict:
    """The per-layer cache of a loaded Llama, in llama-server's /props "kv_cache" shape plus avg_bits."""
    layers = runtime.kv_layer_info(llm)
    summary = evaluate.kv_summary(llm.ctx, llm.model)
    return {"profile": getattr(llm, "qaq_kv_profile", ""), "bytes": summary["kv_bytes"],
            "avg_bits": round(summary["avg_bits"], 4), "layers": layers}


def _models_route(app) -> None:
    """GET /v1/models as llama-cpp-python answers it, each model entry with its kv_cache (null if not loaded)."""
    from fastapi import Depends
    from fastapi.routing import APIRoute
    from llama_cpp.server.app import authenticate, get_llama_proxy

    async def get_models(llama_proxy=Depends(get_llama_proxy)) -> dict:
        current = llama_proxy._current_model_alias
        data = []
        for alias in llama_proxy:
            entry = {"id": alias, "object": "model", "owned_by": "me", "permissions": []}
            llm = llama_proxy._current_model if alias == current else None
            entry["kv_cache"] = kv_cache(llm) if llm is not None else None
            data.append(entry)
        return {"object": "list", "data": data}

    route = APIRoute("/v1/models", get_models, methods=["GET"], dependencies=[Depends(authenticate)],
                     summary="Models (with each loaded model's per-layer KV cache)", tags=["OpenAI V1"])
    app.router.routes.insert(0, route)  # ahead of llama-cpp-python's own /v1/models


def main() -> None:
    import llama_cpp.server.__main__ as entry
    import llama_cpp.server.app as app_mod
    from llama_cpp.server.model import LlamaProxy

    model_cls, settings_cls, config_cls = _settings_classes()
    LlamaProxy.load_llama_from_model_settings = _load_with_profile(LlamaProxy.load_llama_from_model_settings)
    make_app = app_mod.create_app

    def create_app(**kwargs):
        app = make_app(**kwargs)
        _models_route(app)
        return app

    entry.Settings, entry.ModelSettings, entry.ConfigFileSettings = settings_cls, model_cls, config_cls
    app_mod.ConfigFileSettings, app_mod.ModelSettings = config_cls, model_cls
    entry.create_app = create_app
    entry.main()


if __name__ == "__main__":
    main()
