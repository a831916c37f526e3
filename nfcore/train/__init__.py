"""Training: maximum likelihood on data (``fit_density``) and reverse KL against a target
(``fit_target``), sharing one loop with budgets, schedules, early stopping, cancellation and
checkpoints; a Gaussian start taken from the target; and diagnostics that can say "do not trust
this"."""

from .checkpoint import checkpoint_step, load_checkpoint, save_checkpoint
from .density import fit_density
from .diagnostics import MIN_DIAGNOSED_DRAWS, THRESHOLDS, diagnose_draws, evaluate_target, verdict
from .flow_matching import DENSITY_LOSSES, FlowMatching
from .importance import importance_diagnostics, psis
from .loop import DEFAULT_STEPS, SCHEDULES, FitResult, Progress, TrainingDiverged
from .losses import MaximumLikelihood, ReverseKL, beta_schedule
from .start import GaussianStart, pathfinder
from .variational import STARTS, fit_target

__all__ = [
    "fit_density", "fit_target", "evaluate_target", "FitResult", "Progress", "TrainingDiverged",
    "MaximumLikelihood", "ReverseKL", "beta_schedule", "importance_diagnostics", "SCHEDULES",
    "DEFAULT_STEPS", "STARTS", "THRESHOLDS", "psis", "verdict", "diagnose_draws",
    "MIN_DIAGNOSED_DRAWS", "pathfinder", "GaussianStart",
    "save_checkpoint", "load_checkpoint", "checkpoint_step", "FlowMatching", "DENSITY_LOSSES",
]
