"""Progress bars: the libraries' hidden unless ``equi --verbose``, silenced entirely for ``--quiet``; equi's own shown
only on a terminal.

A non-TTY log used to get ~220 carriage-return updates from 14 kinds of library bars (downloads, "Loading weights",
dataset map/filter, …) against 10 lines from equi. Now, without ``--verbose``, huggingface_hub, transformers and
datasets show no bars (:func:`library_bars`), and equi's own bars (``curate: read+score``, ``generating``) go to
stderr only when it is a terminal (:func:`own_bar_disabled`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

#: Environment switches read by the libraries at import time (and by subprocesses, e.g. ``equi scale``'s runs).
LIBRARY_BAR_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def own_bar_disabled(quiet: bool, stream=None) -> bool | None:
    """``disable=`` for one of equi's own tqdm bars: off under ``--quiet`` and when ``stream`` (default stderr) is not
    a terminal, so a log file gets no carriage-return updates."""
    stream = sys.stderr if stream is None else stream
    if quiet:
        return True
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # a closed or fake stream
        return True


def _env_flag(value: str | None) -> bool | None:
    """How the HF libraries read a ``*_DISABLE_PROGRESS_BARS`` variable: unset None, else true or false."""
    return None if value is None else value.upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def library_bars(show: bool = False) -> Iterator[None]:
    """While not ``show``, huggingface_hub, transformers and datasets show no progress bars, in this process and in
    the processes it starts; everything is as before afterwards (CLI tests run many commands in one process).

    The libraries not yet imported are switched off by environment variable (read when they are imported), those
    already imported through their own switches. A user's own ``HF_HUB_DISABLE_PROGRESS_BARS=0`` is left alone.
    """
    if show:
        yield
        return
    saved_env = {name: os.environ.get(name) for name in LIBRARY_BAR_ENV}
    had = {name: name in sys.modules for name in ("transformers", "datasets")}
    hub = hub_states = None
    with contextlib.suppress(ImportError):
        # ~0.1 s; imported first, transformers reads it when imported. (``import a.b.tqdm as x`` would give the class
        # ``tqdm`` that ``a.b`` re-exports under the module's name.)
        hub = importlib.import_module("huggingface_hub.utils.tqdm")

        hub_states = dict(hub.progress_bar_states)
    transformers_shown = datasets_disabled = None
    if had["transformers"]:
        from transformers.utils import logging as hf_logging

        transformers_shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    if had["datasets"]:
        ds_tqdm = importlib.import_module("datasets.utils.tqdm")
        datasets_disabled = ds_tqdm.are_progress_bars_disabled()
        if ds_tqdm.HF_DATASETS_DISABLE_PROGRESS_BARS is not False:
            ds_tqdm.disable_progress_bars()
    for name, value in LIBRARY_BAR_ENV.items():
        os.environ.setdefault(name, value)
    if hub is not None and hub.HF_HUB_DISABLE_PROGRESS_BARS is not False:
        hub.progress_bar_states.clear()
        hub.progress_bar_states["_global"] = False
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if hub is not None:
            hub.progress_bar_states.clear()
            hub.progress_bar_states.update(hub_states)
        if "transformers.utils.logging" in sys.modules:
            from transformers.utils import logging as hf_logging

            if transformers_shown is None:  # imported meanwhile: as its import would have set it without us
                transformers_shown = hub is None or not hub.are_progress_bars_disabled()
            (hf_logging.enable_progress_bar if transformers_shown else hf_logging.disable_progress_bar)()
        if "datasets.utils.tqdm" in sys.modules:
            ds_tqdm = sys.modules["datasets.utils.tqdm"]
            if datasets_disabled is None:  # imported meanwhile, under our variable: undo what it read from it
                flag = _env_flag(saved_env["HF_DATASETS_DISABLE_PROGRESS_BARS"])
                ds_tqdm.HF_DATASETS_DISABLE_PROGRESS_BARS = flag
                with contextlib.suppress(ImportError):
                    import datasets.config

                    datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS = flag
                datasets_disabled = bool(flag)
            ds_tqdm._hf_datasets_progress_bars_disabled = datasets_disabled


@contextlib.contextmanager
def quiet_transformers(active: bool = True) -> Iterator[None]:
    """While active, transformers shows no progress bars and logs only errors; its settings are restored afterwards.

    Covers the bars of loading and saving models ("Loading weights", "Writing model shards") and the load report
    it logs when a checkpoint's weights do not match the class exactly, e.g. the new scoring head of a reward
    model started from a causal LM (``score.weight MISSING``): expected there, and nothing a user of ``--quiet``
    asked to see. Does nothing when transformers is not installed (the static embedder alone does not need it).
    """
    if not active:  # checked first: importing transformers alone costs ~0.4 s (once per worker process)
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
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
