"""Typed engine errors. The service maps each of these to one HTTP status in one place."""

from __future__ import annotations

__all__ = [
    "NFCoreError",
    "SpecError",
    "ShapeError",
    "ArtifactError",
    "TargetError",
    "ExpressionError",
    "TrainingCancelled",
    "ConvergenceError",
    "SolverTimeout",
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


class TargetError(NFCoreError, ValueError):
    """An unknown built-in or plugin target, or a target with bad arguments."""


class ExpressionError(TargetError):
    """A client expression is malformed or uses something outside the whitelist.

    ``position`` is ``(line, column)`` in the expression text (1-based line, 0-based column) when
    known, else ``None``; the message already names it.
    """

    def __init__(self, message: str, position: tuple[int, int] | None = None):
        self.position = position
        where = f" at line {position[0]}, column {position[1]}" if position else ""
        super().__init__(f"{message}{where}")


class TrainingCancelled(NFCoreError):
    """Raised by a training loop whose ``should_stop`` callback said stop; nothing was saved."""


class ConvergenceError(NFCoreError, ArithmeticError):
    """A numerical inverse or ODE solve did not reach its stated tolerance within its iteration
    budget (a fixed-point or root solve, or an adaptive ODE solver whose step size collapsed), or
    met non-finite values on the way. The message names the layer and the residual reached."""


class SolverTimeout(ConvergenceError):
    """An iterative or ODE solve ran past the deadline set by ``nfcore.time_limit``."""
