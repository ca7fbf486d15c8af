"""The errors of reading and writing saved HFF models: one class per cause, so a caller can tell them apart.

Each is a ``ValueError`` (bad input), and each message is one line naming the file, what is wrong and what to do.
"""

__all__ = ['CheckpointError', 'CheckpointFileNotFoundError', 'ConfigError', 'CorruptCheckpointError',
           'FormatVersionError', 'ResourceLimitError', 'ShapeMismatchError', 'UnknownArchitectureError',
           'UnsafeCheckpointError', 'one_line']


class CheckpointError(ValueError):
    """A saved HFF model cannot be read or written; the message says which file, what is wrong, what to do."""


class CheckpointFileNotFoundError(CheckpointError, FileNotFoundError):
    """``config.json`` or ``model.safetensors`` is missing (locally, in the Hub repo, or in the offline cache)."""


class UnsafeCheckpointError(CheckpointError):
    """Weights are a pickle (``.bin``/``.pth``/...): refused, because unpickling can run arbitrary code."""


class CorruptCheckpointError(CheckpointError):
    """``model.safetensors`` is truncated, not a safetensors file, or differs from the checksum in config.json."""


class ShapeMismatchError(CheckpointError):
    """The weights do not fit the model that ``config.json`` describes (shapes, missing or extra tensors)."""


class ConfigError(CheckpointError):
    """``config.json`` is not a valid HFF config (type, range, unknown key); checked before any module is built."""


class ResourceLimitError(ConfigError):
    """Building what ``config.json`` describes would take far more memory or work than its weights justify."""


class FormatVersionError(ConfigError):
    """``config.json`` was written by a newer timm_hff whose format this version cannot read safely."""


class UnknownArchitectureError(ConfigError):
    """``config.json`` names an architecture this timm / timm_hff does not have."""


def one_line(e: BaseException) -> str:
    """The first line of a wrapped library error, so the message that quotes it stays one line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

