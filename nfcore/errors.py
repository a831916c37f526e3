"""Typed engine errors. The service maps each of these to one HTTP status in one place."""

from __future__ import annotations

__all__ = [
    "NFCoreError",
    "SpecError",
    "ShapeError",
    "ArtifactError",
]


class NFCoreError(Exception):
    """Base class of every error the engine raises on purpose."""


class SpecError(NFCoreError, ValueError):
    """A flow spec is invalid. ``field`` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class ShapeError(NFCoreError, ValueError):
    """An input tensor has the wrong shape, dtype or non-finite values."""


class ArtifactError(NFCoreError):
    """A model file is truncated, corrupted, tampered with or does not match its spec."""
