"""Atomic file writes and loading config files by path: the project's one way of doing each.

Every output is written to a hidden temporary name beside its target and renamed over it
(`os.replace` is atomic on one file system), so a crash never leaves a half-written file,
and directory scans skip the dot-named temporary. `suffix` keeps the extension a library
infers the format from (nibabel: ".nii.gz", numpy: ".npy").
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], suffix: str = ".tmp") -> Path:
    """Call `write(tmp)` for a temporary path beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, **dumps) + "\n")


def load_module(path: str | os.PathLike, name: str | None = None) -> ModuleType:
    """Import a Python file by path (config files: configs/ is not a package, and
    ml_collections loads them by path whatever the working directory)."""
    path = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(name or f"_transvw_file_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
