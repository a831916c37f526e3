"""Targets for reverse-KL training: built-ins, client expressions and operator plugins."""

from .base import Target
from .builtins import LOG_Z, WALL, WALL_WIDTH, banana, funnel, gaussian_mixture, u1, u2, u3, u4
from .expression import compile_expression, from_expression
from .registry import from_spec, get, names, register, unregister

__all__ = [
    "Target", "get", "from_spec", "names", "register", "unregister", "from_expression", "compile_expression",
    "LOG_Z", "WALL", "WALL_WIDTH", "u1", "u2", "u3", "u4", "funnel", "banana", "gaussian_mixture",
]
