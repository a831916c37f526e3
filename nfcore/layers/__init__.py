"""Layer families: each maps data to latent (``forward``) and back (``inverse``) with log|det J|."""

from .autoregressive import IAF, MAF, Autoregressive, NSFAutoregressive
from .base import MADE, MLP, Layer
from .cnf import CNF, ODE_METHODS
from .coupling import AffineCoupling, Coupling, NSFCoupling
from .elementwise import Affine, RationalQuadratic
from .linear import ActNorm, LocScale, LULinear, Permute, Standardize
from .planar import PLANAR_TOLERANCE, Planar, Radial
from .residual import RESIDUAL_TOLERANCE, Residual
from .sylvester import SYLVESTER_TOLERANCE, Sylvester
from .tails import Asinh

__all__ = [
    "Layer", "MLP", "MADE", "Affine", "RationalQuadratic", "Coupling", "AffineCoupling",
    "NSFCoupling", "Autoregressive", "MAF", "IAF", "NSFAutoregressive", "Planar", "Radial",
    "PLANAR_TOLERANCE", "LULinear", "ActNorm", "LocScale", "Permute", "Standardize", "Residual",
    "RESIDUAL_TOLERANCE", "Sylvester", "SYLVESTER_TOLERANCE", "CNF", "ODE_METHODS", "Asinh",
    "LAYER_CLASSES",
]

#: Spec ``type`` name -> layer class. Every class takes ``(dim, **hyper_parameters)``.
LAYER_CLASSES: dict[str, type[Layer]] = {
    "planar": Planar,
    "radial": Radial,
    "affine_coupling": AffineCoupling,
    "maf": MAF,
    "iaf": IAF,
    "nsf_coupling": NSFCoupling,
    "nsf_ar": NSFAutoregressive,
    "lu_linear": LULinear,
    "actnorm": ActNorm,
    "loc_scale": LocScale,
    "permute": Permute,
    "standardize": Standardize,
    "asinh": Asinh,
    "residual": Residual,
    "sylvester": Sylvester,
    "cnf": CNF,
}
