"""Import a ``.py`` file that is not in a package (a script, a benchmark, an example, a fixture maker) as a module."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


def load_file(path: str | Path, name: str | None = None,
              register: Callable[[str, ModuleType], object] | None = sys.modules.__setitem__) -> ModuleType:
    """The module that runs ``path``, named ``name`` (the file's stem by default). ``register`` puts it in
    ``sys.modules`` before it runs (dataclasses and pickle look their module up there): pass
    ``lambda n, m: monkeypatch.setitem(sys.modules, n, m)`` to have the test undo it, or None to leave it out."""
    path = Path(path)
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python file that can be imported as a module")
    module = importlib.util.module_from_spec(spec)
    if register is not None:
        register(name, module)
    spec.loader.exec_module(module)
    return module
