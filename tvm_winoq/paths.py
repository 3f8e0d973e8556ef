"""Where tvm-winoq finds its data folders: ``targets/``, ``schedules/`` and ``tune_logs/``.

Resolution order for each folder ``NAME`` (first match wins):

1. the environment variable ``WINOQ_<NAME>_DIR`` (e.g. ``WINOQ_TUNE_LOGS_DIR``);
2. ``$WINOQ_HOME/<name>`` when ``WINOQ_HOME`` is set;
3. the source checkout: ``<repo>/<name>`` beside the ``tvm_winoq`` package (editable installs, CI);
4. the copy installed with the wheel under ``<sys.prefix>/share/tvm-winoq/<name>``.

Tuning writes go to the first writable location of that list; for a read-only wheel install that
is ``~/.cache/tvm-winoq/tune_logs`` (the shipped logs are still read).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
FOLDERS = ("targets", "schedules", "tune_logs")


def _candidates(name: str) -> list[Path]:
    env = os.environ.get(f"WINOQ_{name.upper()}_DIR")
    out: list[Path] = []
    if env:
        out.append(Path(env))
    home = os.environ.get("WINOQ_HOME")
    if home:
        out.append(Path(home) / name)
    out.append(REPO_DIR / name)
    out.append(Path(sys.prefix) / "share" / "tvm-winoq" / name)
    return out


def data_dir(name: str) -> Path:
    """Return the folder ``name`` (one of ``targets``, ``schedules``, ``tune_logs``).

    Raises
    ------
    FileNotFoundError
        If no candidate location exists.
    """
    if name not in FOLDERS:
        raise ValueError(f"unknown data folder {name!r}; expected one of {FOLDERS}")
    for cand in _candidates(name):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        f"tvm-winoq data folder {name!r} not found (looked in: "
        + ", ".join(str(c) for c in _candidates(name))
        + "); set WINOQ_HOME or WINOQ_"
        + name.upper()
        + "_DIR"
    )


def targets_dir() -> Path:
    """Folder of target presets."""
    return data_dir("targets")


def schedules_dir() -> Path:
    """Folder of hand-written schedule modules."""
    return data_dir("schedules")


def tune_logs_dir(writable: bool = False) -> Path:
    """Folder of MetaSchedule databases; with ``writable`` the first location we may write to."""
    if not writable:
        return data_dir("tune_logs")
    for cand in _candidates("tune_logs"):
        if cand.is_dir() and os.access(cand, os.W_OK):
            return cand
    fallback = Path.home() / ".cache" / "tvm-winoq" / "tune_logs"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def cache_dir() -> Path:
    """Per-user cache (finetuned scales, downloaded nothing): ``$WINOQ_CACHE`` or ``~/.cache/tvm-winoq``."""
    path = Path(os.environ.get("WINOQ_CACHE", Path.home() / ".cache" / "tvm-winoq"))
    path.mkdir(parents=True, exist_ok=True)
    return path
