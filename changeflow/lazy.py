"""A module imported on first use: for a client library that only a store's writer and admin code need.

Loading a pipeline imports every registered store's module (``pipelines.model.store_classes``: each carries its
configuration model), so a client library imported at the top of a store module is paid by every command that
reads a pipeline file, ``changeflow pipeline check`` included. ``lazy_import("redis")`` is a module object
whose first attribute access imports the real module (and keeps its names, so later accesses cost nothing).
Type checkers see the real module: ``if TYPE_CHECKING: import redis`` / ``else: redis = lazy_import("redis")``.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class _LazyModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)
        return getattr(module, attr)


def lazy_import(name: str) -> Any:
    """The module ``name``, imported when one of its attributes is first read."""
    return _LazyModule(name)
