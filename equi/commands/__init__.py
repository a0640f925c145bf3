"""One module per ``equi`` command; each exposes ``register(app)``."""

from __future__ import annotations

import importlib

_NAMES = ["curate", "verify", "fit_categoriser", "guard", "train", "scale", "eval", "report"]

COMMAND_MODULES = []
for _name in _NAMES:
    try:
        COMMAND_MODULES.append(importlib.import_module(f"equi.commands.{_name}"))
    except ModuleNotFoundError as _exc:  # a command whose module is not written yet
        if _exc.name != f"equi.commands.{_name}":
            raise
