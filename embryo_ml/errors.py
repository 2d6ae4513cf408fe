"""Exceptions the CLI turns into a one-line message and a non-zero exit.

Everything a user can cause (bad config, unreadable image, tampered bundle, missing folder) raises
one of these, so the CLI never shows a traceback for a user mistake.
"""

from __future__ import annotations


class EmbryoMLError(Exception):
    """Base class: a problem the user can fix; its message is shown as is."""


class ConfigError(EmbryoMLError):
    """A config file or `--set` override is invalid (unknown key, wrong type)."""


class DataError(EmbryoMLError):
    """A manifest or image folder cannot be used (missing, empty, wrong columns)."""


class ImageReadError(EmbryoMLError):
    """One image cannot be decoded; the message names the file and the reason."""

    def __init__(self, path: object, reason: str | None = None) -> None:
        # One-argument form too: DataLoader workers re-raise exceptions from their message.
        self.path = str(path)
        self.reason = reason or ""
        super().__init__(f"{self.path}: {reason}" if reason else self.path)


class BundleError(EmbryoMLError):
    """A scoring bundle is missing, incomplete, tampered with, or of another schema version."""


class TrackingError(EmbryoMLError):
    """The MLflow tracking store cannot be reached or used."""


class ValidationFailedError(EmbryoMLError):
    """A training run failed its model-quality gate (`metrics.json` `validation`), so it is not
    exported (without an explicit override) and never registered."""
