"""Errors a user can cause while indexing or searching; all are duomo errors, so the CLI prints one line."""

from __future__ import annotations

from duomo.errors import DuomoError, InputError


class ModelMismatchError(DuomoError):
    """The index was built with another model than the one given."""

    status_code = 409


class IndexBusyError(DuomoError):
    """Another process is updating this index right now."""

    status_code = 409


class IndexCorruptError(DuomoError):
    """The index database cannot be read, or was written by a newer duomo."""

    status_code = 500


class QueryError(InputError):
    """A search query that cannot be parsed or embedded."""
