"""Training: maximum likelihood on data (``fit_density``) and reverse KL against a target
(``fit_target``), sharing one loop with schedules, early stopping, cancellation and checkpoints."""

from .checkpoint import load_checkpoint, save_checkpoint
from .density import fit_density
from .flow_matching import DENSITY_LOSSES, FlowMatching
from .loop import DEFAULT_STEPS, SCHEDULES, FitResult, Progress, TrainingDiverged
from .losses import MaximumLikelihood, ReverseKL, beta_schedule, importance_diagnostics
from .variational import evaluate_target, fit_target

__all__ = [
    "fit_density", "fit_target", "evaluate_target", "FitResult", "Progress", "TrainingDiverged",
    "MaximumLikelihood", "ReverseKL", "beta_schedule", "importance_diagnostics", "SCHEDULES",
    "DEFAULT_STEPS", "FlowMatching", "DENSITY_LOSSES",
    "save_checkpoint", "load_checkpoint",
]
