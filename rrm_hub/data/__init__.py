"""Image data: Hugging Face `datasets` (Hub ids, folders, IDX files, the embedded digits) seen as loaders of [0, 1]
pixels; `datasets` itself is imported by the modules that read data, not here."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where rrm-hub keeps what it builds locally (`$RRM_HUB_CACHE`, default `~/.cache/rrm_hub`)."""
    return Path(os.environ.get("RRM_HUB_CACHE", Path.home() / ".cache" / "rrm_hub"))
