"""Where equi keeps what it computes once and reuses: converted models, reference log-probs, embeddings,
the distilled static embedder. One directory for all of them: ``$EQUI_CACHE``, else
``$XDG_CACHE_HOME/equi``, else ``~/.cache/equi``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("EQUI_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "equi")
    return Path(root).expanduser()
