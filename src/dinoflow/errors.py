"""Errors a user can act on: each names what was wrong and what would be right."""


class DinoflowError(Exception):
    """Base class: the CLI prints these as one line, without a stack trace."""


class StorageError(DinoflowError):
    """Object storage could not be reached, or a bucket/key/credential is missing."""


class SpecError(DinoflowError):
    """A stage spec contradicts its inputs (checked before any work is done)."""
