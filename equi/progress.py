"""Progress bars of the libraries equi drives, silenced for ``--quiet``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def no_loading_bars(active: bool = True) -> Iterator[None]:
    """While active, transformers shows no "Loading weights" bar; its setting is restored afterwards.

    Covers loading and saving models ("Loading weights", "Writing model shards"). Does nothing when
    transformers is not installed (the static embedder alone does not need it).
    """
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        active = False
    if not active:
        yield
        return
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def no_library_deprecations(active: bool = True) -> Iterator[None]:
    """While active, FutureWarnings (libraries' deprecation notices to each other, e.g. TRL calling a renamed
    transformers method) are not shown: nothing a user of ``--quiet`` can act on. equi's own warnings still are."""
    import warnings

    with warnings.catch_warnings():
        if active:
            warnings.simplefilter("ignore", FutureWarning)
        yield
