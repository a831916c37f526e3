"""Targets for reverse-KL training: built-ins, models in the model language, client expressions
and operator plugins.

- ``ModelTarget`` / ``from_model``: a Bayesian model with named, constrained parameters, data,
  ``log_prob`` terms and ``derived`` quantities (``nfcore.targets.model`` documents the language;
  ``nfcore.targets.functions`` its functions and log densities; ``nfcore.targets.transforms``
  the constraint transforms).
- ``from_spec``: any target from its JSON form; ``Target.spec`` gives that JSON back.
- ``Target``: the common interface: ``log_prob(z)`` over the unconstrained space for fitting, and
  ``columns``, ``constrain``, ``unconstrain``, ``target_log_prob``, ``derived`` and ``draws``
  for reporting samples in the constrained space.
"""

from .base import Draws, Target
from .builtins import LOG_Z, WALL, WALL_WIDTH, banana, funnel, gaussian_mixture, u1, u2, u3, u4
from .expression import compile_expression, from_expression
from .model import ModelTarget, from_model
from .registry import from_spec, get, names, register, unregister

__all__ = [
    "Target", "Draws", "ModelTarget", "from_model", "get", "from_spec", "names", "register",
    "unregister", "from_expression", "compile_expression",
    "LOG_Z", "WALL", "WALL_WIDTH", "u1", "u2", "u3", "u4", "funnel", "banana", "gaussian_mixture",
]
