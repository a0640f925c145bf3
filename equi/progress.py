"""Progress bars of the libraries equi drives, silenced for ``--quiet``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers(active: bool = True) -> Iterator[None]:
    """While active, transformers shows no progress bars and logs only errors; its settings are restored afterwards.

    Covers the bars of loading and saving models ("Loading weights", "Writing model shards") and the load report
    it logs when a checkpoint's weights do not match the class exactly, e.g. the new scoring head of a reward
    model started from a causal LM (``score.weight MISSING``): expected there, and nothing a user of ``--quiet``
    asked to see. Does nothing when transformers is not installed (the static embedder alone does not need it).
    """
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        active = False
    if not active:
        yield
        return
    shown, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
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
