"""Every error linmem raises on purpose. Each message names the problem and what was expected."""

from __future__ import annotations


class LinmemError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""

    code = "error"


class BadName(LinmemError):
    code = "bad_name"


class NoSuchMemory(LinmemError):
    code = "no_such_memory"


class BadInput(LinmemError):
    """Input data that cannot be read: a file, a line and what was wrong with it."""

    code = "bad_input"


class CorruptMemory(LinmemError):
    """A memory's log file is damaged or not a linmem log; the message names the file."""

    code = "corrupt_memory"


class DiskFull(LinmemError):
    """A write failed for lack of disk space; nothing of it was kept."""

    code = "disk_full"


class NotAllowed(LinmemError):
    """A request named a model or embedder the service was not configured to use."""

    code = "not_allowed"


class EmptyMemory(LinmemError):
    code = "empty_memory"

    @classmethod
    def named(cls, name: str) -> EmptyMemory:
        """The error for reading memory `name`, which has no items."""
        return cls(f"memory {name!r} is empty: write items first (linmem write)")


class UnknownSpec(LinmemError):
    code = "unknown_spec"


class ModelUnavailable(LinmemError):
    code = "model_unavailable"


class ContextOverflow(LinmemError):
    """The prompt does not fit the model's context; raised instead of truncating."""

    code = "context_overflow"

    def __init__(self, message: str, *, needed: int, limit: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.limit = limit


class EngineError(LinmemError):
    """A backend (an HTTP endpoint, a model) failed while answering."""

    code = "engine_error"
