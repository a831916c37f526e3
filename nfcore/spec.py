"""Flow specs: validation with field-named errors, defaults, and preset expansion.

A spec is plain JSON. ``normalize_spec`` returns the canonical form that ``build`` consumes and that
artifacts store: presets expanded, every default filled in, nothing unknown left.

A conditional flow (``context_dim > 0``) may embed its context first: ``"embedding": {"hidden":
[64, 64], "features": 16, "activation": "relu"}`` (``features`` required) puts a small network
between the raw context and every conditional layer, which then sees ``features`` numbers instead
of ``context_dim``: useful for large contexts (an image, a long series). The key appears in the
normalized spec only when given.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

from .errors import SpecError

__all__ = ["normalize_spec", "LAYER_TYPES", "PRESETS", "LIMITS", "MIXINGS", "CONDITIONAL"]

#: Bounds that keep a client from asking for an absurd network.
LIMITS = {"dim": 4096, "context_dim": 4096, "layers": 256, "hidden_width": 4096,
          "hidden_depth": 8, "bins": 128, "transforms": 64}

_MISSING = object()


def _int(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(field: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpecError(field, f"expected an integer; got {v!r}")
        if not lo <= v <= hi:
            raise SpecError(field, f"expected an integer in [{lo}, {hi}]; got {v}")
        return v
    return check


def _positive_float(hi: float) -> Callable[[str, Any], float]:
    def check(field: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise SpecError(field, f"expected a finite number; got {v!r}")
        if not 0 < v <= hi:
            raise SpecError(field, f"expected a number in (0, {hi}]; got {v}")
        return float(v)
    return check


def _choice(*options: str) -> Callable[[str, Any], str]:
    def check(field: str, v: Any) -> str:
        if v not in options:
            raise SpecError(field, f"expected one of {list(options)}; got {v!r}")
        return v
    return check


def _hidden(field: str, v: Any) -> list[int]:
    if not isinstance(v, list | tuple) or not 1 <= len(v) <= LIMITS["hidden_depth"]:
        raise SpecError(field, f"expected a list of 1 to {LIMITS['hidden_depth']} layer widths; "
                               f"got {v!r}")
    return [_int(1, LIMITS["hidden_width"])(f"{field}[{i}]", h) for i, h in enumerate(v)]


def _hidden_or_linear(field: str, v: Any) -> list[int]:
    """Like ``_hidden``, and ``[]`` too: a linear map (the paper's amortised planar flows)."""
    return [] if isinstance(v, list | tuple) and not v else _hidden(field, v)


def _open_unit(field: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
        raise SpecError(field, f"expected a number in (0, 1); got {v!r}")
    return float(v)


def _bool(field: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise SpecError(field, f"expected true or false; got {v!r}")
    return v


_ACTIVATION = _choice("relu", "elu", "silu", "gelu", "tanh")
_NET = {"hidden": ([64, 64], _hidden), "activation": ("relu", _ACTIVATION)}
_AFFINE = {**_NET, "scale_bound": (6.0, _positive_float(20.0))}
_SPLINE = {**_NET, "bins": (8, _int(2, LIMITS["bins"])), "bound": (5.0, _positive_float(1e4))}

#: Each layer type's hyper-parameters: name -> (default, validator).
LAYER_TYPES: dict[str, dict[str, tuple[Any, Callable]]] = {
    # Their context network's widths; filled in (and allowed) only when context_dim > 0.
    "planar": {"hidden": ([64, 64], _hidden_or_linear), "activation": ("relu", _ACTIVATION)},
    "radial": {"hidden": ([64, 64], _hidden_or_linear), "activation": ("relu", _ACTIVATION)},
    "affine_coupling": _AFFINE,
    "maf": _AFFINE,
    "iaf": _AFFINE,
    "nsf_coupling": _SPLINE,
    "nsf_ar": _SPLINE,
    "lu_linear": {"permutation": ("random", _choice("random", "reverse"))},
    "actnorm": {},
    "loc_scale": {"triangular": (True, _bool)},
    "permute": {"kind": ("reverse", _choice("reverse", "random")),
                "seed": (0, _int(0, 2**31 - 1))},
    "standardize": {},
    "asinh": {},
    "residual": {"hidden": ([64, 64], _hidden), "lipschitz": (0.97, _open_unit),
                 "exact_dim": (16, _int(0, LIMITS["dim"]))},
    # rank and reflections default to dim (filled in by _layer).
    "sylvester": {"kind": ("orthogonal", _choice("orthogonal", "householder")),
                  "rank": (None, _int(1, LIMITS["dim"])),
                  "reflections": (None, _int(1, LIMITS["dim"])),
                  "hidden": ([64, 64], _hidden_or_linear), "activation": ("relu", _ACTIVATION),
                  # What its context network shifts (see nfcore.layers.Sylvester).
                  "amortize": ("diagonals", _choice("diagonals", "all"))},
    "cnf": {"hidden": ([64, 64], _hidden), "activation": ("silu", _ACTIVATION),
            "rtol": (1e-5, _positive_float(1.0)), "atol": (1e-6, _positive_float(1.0)),
            "method": ("dopri5", _choice("dopri5", "dopri8", "bosh3", "adaptive_heun")),
            "exact_dim": (16, _int(0, LIMITS["dim"])), "freqs": (3, _int(0, 16))},
}
_COUPLING = {"affine_coupling", "nsf_coupling"}
#: What a coupling preset (``realnvp``, ``nsf``) uses in one dimension: the autoregressive layer
#: with the same element-wise map and hyper-parameters.
_ONE_FEATURE = {"affine_coupling": "maf", "nsf_coupling": "nsf_ar"}
#: Layer types whose hyper-parameters only describe a context network: without a context they
#: are left out of the canonical spec, and giving one is an error.
_CONTEXT_ONLY = {"planar", "radial"}
#: Layer types that take a context.
CONDITIONAL = frozenset({"affine_coupling", "maf", "iaf", "nsf_coupling", "nsf_ar", "residual",
                         "sylvester", "cnf", "planar", "radial"})

#: Preset name -> (repeated layer type, whether to put a permutation between repeats, whether an
#: ``actnorm`` goes before each repeat, the default number of repeats).
#: ``resflow`` follows Chen et al. (2019), an ActNorm before each residual block; ``cnf`` is one
#: continuous-time layer (its depth is the vector field's), as flow matching trains it.
PRESETS: dict[str, tuple[str, bool, bool, int]] = {
    "planar": ("planar", False, False, 5),
    "radial": ("radial", False, False, 5),
    "realnvp": ("affine_coupling", True, False, 5),
    "maf": ("maf", True, False, 5),
    "iaf": ("iaf", True, False, 5),
    "nsf": ("nsf_coupling", True, False, 5),
    "nsf_ar": ("nsf_ar", True, False, 5),
    "resflow": ("residual", False, True, 5),
    "sylvester": ("sylvester", False, False, 5),
    "cnf": ("cnf", False, False, 1),
}
_PRESET_KEYS = {"preset": None, "dim": None, "context_dim": None, "dtype": None, "base": None,
                "transforms": None, "standardize": None, "loc_scale": None, "mixing": None,
                "asinh": None, "embedding": None}

#: Above this dimension a preset's ``loc_scale`` layer is diagonal (its triangular factor would
#: cost O(dim^2) per row and parameters).
LOC_SCALE_TRIANGULAR_MAX_DIM = 256

#: What a preset puts between its repeated layers (``"mixing"``): the reverse order (default), a
#: fixed random permutation, or a learned ``lu_linear`` (a permutation times a learned LU
#: factorization, as Durkan et al. 2019 put between their NSF layers: it mixes every feature
#: into every other, at O(dim^2) per row). Its permutation is random, as theirs, except in two
#: dimensions, where it is the reverse order so that the order alternates between layers.
MIXINGS = ("reverse", "random", "lu")


def _check_keys(field: str, obj: Mapping, allowed: set[str]) -> None:
    for key in obj:
        if key not in allowed:
            where = f"{field}.{key}" if field else str(key)
            raise SpecError(where, f"unknown key; expected one of {sorted(allowed)}")


def _layer(field: str, raw: Any, dim: int, context_dim: int) -> dict:
    if not isinstance(raw, Mapping):
        raise SpecError(field, f"expected an object with a 'type'; got {raw!r}")
    kind = raw.get("type", _MISSING)
    if kind is _MISSING:
        raise SpecError(f"{field}.type", "missing")
    if kind not in LAYER_TYPES:
        raise SpecError(f"{field}.type", f"unknown layer type {kind!r}; expected one of "
                                         f"{sorted(LAYER_TYPES)}")
    schema = LAYER_TYPES[kind]
    _check_keys(field, raw, {"type", *schema})
    if kind in _COUPLING and dim < 2:
        raise SpecError(f"{field}.type", f"{kind} needs dim >= 2; got dim {dim}")
    out = {"type": kind}
    if kind in _CONTEXT_ONLY and not context_dim:
        for name in schema:
            if name in raw:
                raise SpecError(f"{field}.{name}", f"only a conditional {kind} layer has a "
                                                   "context network; set context_dim > 0")
        return out
    for name, (default, check) in schema.items():
        value = raw.get(name, _MISSING)
        out[name] = copy.deepcopy(default) if value is _MISSING else check(f"{field}.{name}", value)
    if kind == "sylvester":
        out["rank"] = dim if out["rank"] is None else out["rank"]
        out["reflections"] = dim if out["reflections"] is None else out["reflections"]
        if out["rank"] > dim:
            raise SpecError(f"{field}.rank", f"expected at most dim ({dim}); got {out['rank']}")
        if out["amortize"] == "all" and not context_dim:
            raise SpecError(f"{field}.amortize", "only a conditional sylvester layer amortizes "
                                                 "its parameters; set context_dim > 0")
    return out


def _expand_preset(raw: Mapping) -> list[dict]:
    name = raw["preset"]
    if name not in PRESETS:
        raise SpecError("preset", f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    kind, permute, actnorm, default_transforms = PRESETS[name]
    if raw.get("dim") == 1 and kind in _COUPLING:
        # One feature leaves nothing to couple on: take the autoregressive layer of the same map
        # (same hyper-parameters), whose one feature's map is learned outright (or comes from the
        # context), so that a one-parameter model or a single column still fits with the preset.
        kind = _ONE_FEATURE[kind]
    params = set(LAYER_TYPES[kind])
    _check_keys("", raw, set(_PRESET_KEYS) | params)
    transforms = _int(1, LIMITS["transforms"])("transforms",
                                               raw.get("transforms", default_transforms))
    standardize = _bool("standardize", raw.get("standardize", True))
    # Heavy tails: an asinh layer in front, off by default (see nfcore.layers.Asinh).
    asinh = _bool("asinh", raw.get("asinh", False))
    loc_scale = _bool("loc_scale", raw.get("loc_scale", True))
    mixing = _choice(*MIXINGS)("mixing", raw.get("mixing", "reverse"))
    if not permute and "mixing" in raw:
        raise SpecError("mixing", f"preset {name!r} puts nothing between its layers")
    layer = {"type": kind, **{k: raw[k] for k in params if k in raw}}
    # In two dimensions a random order is the identity half the time, and two autoregressive
    # layers in a row would then see the features in the same order: take the reverse there.
    lu = {"type": "lu_linear", "permutation": "reverse" if raw["dim"] == 2 else "random"}
    layers: list[dict] = [{"type": "asinh"}] if asinh else []
    if standardize:
        layers.append({"type": "standardize"})
    if loc_scale:
        layers.append({"type": "loc_scale",
                       "triangular": raw["dim"] <= LOC_SCALE_TRIANGULAR_MAX_DIM})
    for i in range(transforms):
        if permute and i > 0:
            layers.append({"lu": lu,
                           "random": {"type": "permute", "kind": "random", "seed": i},
                           "reverse": {"type": "permute", "kind": "reverse"}}[mixing])
        if actnorm:
            layers.append({"type": "actnorm"})
        layers.append(copy.deepcopy(layer))
    return layers


def _embedding(raw: Any, context_dim: int) -> dict:
    if not isinstance(raw, Mapping):
        raise SpecError("embedding", f"expected an object with 'features'; got {raw!r}")
    _check_keys("embedding", raw, {"hidden", "features", "activation"})
    if "features" not in raw:
        raise SpecError("embedding.features", "missing")
    if not context_dim:
        raise SpecError("embedding", "a context embedding needs context_dim > 0")
    return {"hidden": _hidden("embedding.hidden", raw.get("hidden", [64, 64])),
            "features": _int(1, LIMITS["context_dim"])("embedding.features", raw["features"]),
            "activation": _ACTIVATION("embedding.activation", raw.get("activation", "relu"))}


def normalize_spec(spec: Any) -> dict:
    """Validate ``spec`` and return its canonical form. Raises ``SpecError`` naming the field."""
    if not isinstance(spec, Mapping):
        raise SpecError("", f"expected a JSON object; got {type(spec).__name__}")
    if "dim" not in spec:
        raise SpecError("dim", "missing")
    dim = _int(1, LIMITS["dim"])("dim", spec["dim"])
    context_dim = _int(0, LIMITS["context_dim"])("context_dim", spec.get("context_dim", 0))
    dtype = _choice("float32", "float64")("dtype", spec.get("dtype", "float32"))
    base = spec.get("base", {"type": "normal"})
    if not isinstance(base, Mapping):
        raise SpecError("base", f"expected an object; got {base!r}")
    _check_keys("base", base, {"type"})
    _choice("normal")("base.type", base.get("type", "normal"))

    if "preset" in spec:
        if "layers" in spec:
            raise SpecError("layers", "give either 'preset' or 'layers', not both")
        raw_layers = _expand_preset(spec)
    else:
        _check_keys("", spec, {"dim", "context_dim", "dtype", "base", "layers", "embedding"})
        raw_layers = spec.get("layers", _MISSING)
        if raw_layers is _MISSING:
            raise SpecError("layers", "missing; give 'layers' or a 'preset'")
        if not isinstance(raw_layers, list | tuple) or not raw_layers:
            raise SpecError("layers", f"expected a non-empty list; got {raw_layers!r}")
    if len(raw_layers) > LIMITS["layers"]:
        raise SpecError("layers", f"at most {LIMITS['layers']} layers; got {len(raw_layers)}")
    layers = [_layer(f"layers[{i}]", raw, dim, context_dim) for i, raw in enumerate(raw_layers)]
    if context_dim and not any(layer["type"] in CONDITIONAL for layer in layers):
        raise SpecError("context_dim", "no layer of this flow can be conditioned on a context; "
                                       f"use one of {sorted(CONDITIONAL)}")
    out = {"dim": dim, "context_dim": context_dim, "dtype": dtype, "base": {"type": "normal"},
           "layers": layers}
    if "embedding" in spec:
        out["embedding"] = _embedding(spec["embedding"], context_dim)
    return out
