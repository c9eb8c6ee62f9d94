"""Progress bars on long work (tqdm), one way for every command."""
from __future__ import annotations


def progress_bar(progress: bool, total: int | None, desc: str, unit: str = "chunk", unit_scale: bool = False):
    """A tqdm bar on stderr, or None when progress is off."""
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, dynamic_ncols=True)
