"""nfcore: normalizing flows built from a JSON spec, trained, saved as safetensors, and served."""

from . import targets
from .artifact import (
    FORMAT_VERSION,
    ArtifactInfo,
    atomic_write,
    load,
    loads,
    read_info,
    read_metadata,
    save,
    saves,
)
from .errors import (
    ArtifactError,
    ConvergenceError,
    ExpressionError,
    NFCoreError,
    ShapeError,
    SolverTimeout,
    SpecError,
    TargetError,
    TrainingCancelled,
)
from .flow import Flow, build
from .limits import time_limit
from .spec import LAYER_TYPES, PRESETS, normalize_spec
from .train import FitResult, Progress, TrainingDiverged, fit_density, fit_target

__all__ = [
    "Flow", "build", "save", "saves", "atomic_write", "load", "loads", "read_metadata", "read_info",
    "ArtifactInfo", "normalize_spec",
    "LAYER_TYPES", "PRESETS", "FORMAT_VERSION", "NFCoreError", "SpecError", "ShapeError",
    "ArtifactError", "TargetError", "ExpressionError", "TrainingCancelled", "ConvergenceError",
    "SolverTimeout", "time_limit",
    "targets", "fit_density", "fit_target", "FitResult", "Progress", "TrainingDiverged",
]
