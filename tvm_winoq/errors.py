"""Error types of tvm-winoq.

Every error a user can cause derives from :class:`WinoqError`, so the CLI can print one clean line
(``winoq: <message>``) instead of a traceback.  Configuration errors are also ``ValueError`` so that
dataclass validation reads naturally in Python code.
"""

from __future__ import annotations


class WinoqError(Exception):
    """Base class of all user-facing tvm-winoq errors."""


class ConfigError(WinoqError, ValueError):
    """A configuration value is invalid; the message names the field."""


class WeightsNotFoundError(WinoqError, FileNotFoundError):
    """Pretrained weights (an offline weights package) are not installed."""


class ModelError(WinoqError):
    """A model cannot be loaded, exported or compiled."""


class TargetError(WinoqError, ValueError):
    """Unknown or unusable target preset."""


class TuneLogError(WinoqError):
    """A tuning database is corrupt, foreign (other target / workload) or unreadable."""


class DeviceError(WinoqError):
    """An RPC device, tracker or emulated board is unreachable or failed."""
