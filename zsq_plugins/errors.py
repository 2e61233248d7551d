"""Typed errors. Every message says what was wrong and what to do about it."""

from __future__ import annotations


class ZSQError(Exception):
    """Base class of every error raised on purpose by zsq_plugins."""


class MissingDependencyError(ZSQError, ImportError):
    """An optional dependency (a toolkit, a data package) is not installed."""


class UnknownPluginError(ZSQError, LookupError):
    """A name was looked up in a registry that does not hold it."""

    def __str__(self) -> str:  # LookupError would quote the message like a dict key
        return str(self.args[0]) if self.args else ""


class DuplicatePluginError(ZSQError, ValueError):
    """A name was registered twice in the same registry."""


class DatasetNotFoundError(ZSQError, FileNotFoundError):
    """A data set is not where it was looked for."""


class ChecksumMismatchError(ZSQError):
    """A file's content does not match the checksum recorded for it."""


class CacheMismatchError(ZSQError):
    """A cached artifact was made for another model, configuration or format."""


class UnsupportedModelError(ZSQError, ValueError):
    """The model cannot be handled as asked (wrong structure, bad weights, untraceable)."""


class ToolkitOptionError(ZSQError, ValueError):
    """A toolkit option the adapter does not take, or a value the toolkit cannot use."""
