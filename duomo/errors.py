"""duomo's exception types: every error a user can cause is one of these, saying what to do."""

from __future__ import annotations


class DuomoError(Exception):
    """Base of every error duomo raises on purpose; the CLI prints it as one line, the server as a 4xx."""

    status_code: int = 400


class UnknownModelError(DuomoError, KeyError):
    """A model name that is neither a known config nor an existing path."""

    status_code = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(DuomoError):
    """A checkpoint that cannot be read, or whose keys/shapes do not fit the model."""


class ImageError(DuomoError):
    """An image that cannot be decoded: missing, corrupt, unsupported, or too large."""


class InputError(DuomoError, ValueError):
    """Arguments of the wrong type, shape or value."""


class ConfigError(DuomoError, ValueError):
    """A model or training config that is malformed or inconsistent."""
