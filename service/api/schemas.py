"""Request and response schemas of the HTTP API, one family per resource, all in one place:
inference, models, training jobs, datasets and health.

Every field has a description and an example, so ``/docs`` documents the whole API. The inference
routes parse their bodies with orjson and numpy in the protocol layer rather than field by field
(a 1M-row ``x`` would be slow through pydantic); these models are still their documented contract,
and the protocol validates every non-array field with their ``*Options`` bases.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi.responses import Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from ..inference.protocol import LogProbOptions, SampleOptions
from ..store import NAME_PATTERN
from ..training import DatasetRecord, JobRecord
from ..training.requests import BUDGET_RULES, default_text
from ..training.runner import diagnostics
from ..wire import JSON, JobStatus

__all__ = [
    "FastJSONResponse", "ErrorPublic", "LogProbRequest", "LogProbOptions", "LogProbResponse",
    "SampleRequest", "SampleOptions", "SampleResponse", "Diagnostics", "ModelVersionPublic",
    "ModelPublic", "ModelSummary", "TargetPublic", "ModelsPublic", "ModelUploaded", "TrainingOptions",
    "DensityObjective", "BuiltinTarget", "ExpressionTarget", "ModelLanguageTarget",
    "VariationalObjective", "JobCreate",
    "JobAccepted", "ProgressPublic", "JobResult", "JobPublic", "JobsPublic", "DatasetPublic",
    "HealthPublic", "CheckPublic", "job_public", "dataset_public", "diagnostics_of",
]


class FastJSONResponse(Response):
    """JSON rendered by orjson, numpy arrays included (no per-element Python work)."""

    media_type = JSON

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class ErrorPublic(BaseModel):
    """Every error answer."""

    detail: str = Field(description="What was wrong, precisely.",
                        examples=["x has 3 columns; model 'two_moons' version 1 expects 2"])


# ---------------------------------------------------------------------------------- inference
class LogProbRequest(LogProbOptions):
    """Score points under a model. As ``application/octet-stream``, send a safetensors body with
    tensors ``x`` (and ``context``) and put ``model``/``version`` in the query string.

    A model fit to a model-language target (``GET /models/{name}`` shows its ``target``) scores
    values in its constrained space: named ``values``, or rows ``x`` in its ``param_columns``
    order; the answer is log q there. A value outside a parameter's support is a 422 naming it."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "two_moons", "x": [[0.5, -0.25], [1.0, 0.3]]},
        {"model": "eight_schools", "values": {"mu": [4.1, 3.2], "tau": [2.5, 0.8],
                                              "theta_tilde": [[0.1] * 8, [-0.3] * 8]}}]})

    x: list[list[float]] | None = Field(
        None, description="Points, one row per point, each of the model's dimension (for a "
        "model-language target: its constrained parameter columns). Give x or values.",
        examples=[[[0.5, -0.25], [1.0, 0.3]]])
    values: dict[str, list[Any]] | None = Field(
        None, description="Models fit to a model-language target: constrained values, one array "
        "of shape (N, *shape) per parameter (all parameters, N rows each).",
        examples=[{"mu": [4.1, 3.2], "tau": [2.5, 0.8],
                   "theta_tilde": [[0.1] * 8, [-0.3] * 8]}])
    context: list[list[float]] | list[float] | dict[str, Any] | None = Field(
        None, description="Conditioning values for a conditional model: one row per point, or one "
                          "row for all points; for a model with a 'context' block, also named "
                          "values {name: value}.", examples=[None])


class LogProbResponse(BaseModel):
    """Log densities, one per row of ``x``. As ``application/octet-stream`` (``Accept`` header):
    a safetensors body with the tensor ``log_prob`` and ``exact`` in its metadata."""

    model: str = Field(description="Model name.", examples=["two_moons"])
    version: int = Field(description="Model version that answered.", examples=[1])
    log_prob: list[float] = Field(description="log p(x) per row, in the data's own units.",
                                  examples=[[-1.42, -2.07]])
    exact: bool = Field(description="Whether log_prob is exact (to the solvers' stated tolerance); "
                                    "false when it is an unbiased estimate (a residual flow above "
                                    "its exact_dim).", examples=[True])


class SampleRequest(SampleOptions):
    """Draw samples with their log densities. As ``application/octet-stream``, put the options in
    the query string and, for a conditional model, a safetensors body with the tensor
    ``context``."""

    context: list[list[float]] | list[float] | dict[str, Any] | None = Field(
        None, description="Conditioning values for a conditional model: n rows, or one row; for "
                          "a model with a 'context' block (an amortized posterior), also named "
                          "values {name: value}.", examples=[None])


class SampleResponse(BaseModel):
    """Samples and their log densities. As ``application/octet-stream`` (``Accept`` header): a
    safetensors body with tensors ``samples`` and ``log_prob``.

    A model fit to a model-language target answers in its constrained space: ``columns`` names
    the columns of ``samples`` (parameters, then derived quantities), ``log_prob`` is log q there
    and ``target_log_prob`` the model's log density, so ``target_log_prob - log_prob`` are
    importance log-weights. Its safetensors answer adds the tensor ``target_log_prob`` and the
    ``columns`` (JSON text) in its metadata."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "two_moons", "version": 1, "samples": [[0.1, 0.9], [1.8, -0.2]],
         "log_prob": [-1.1, -0.9]},
        {"model": "scale", "version": 1, "columns": ["mu", "sigma", "var"],
         "samples": [[1.2, 0.8, 0.64], [0.9, 1.1, 1.21]], "log_prob": [-1.3, -1.8],
         "target_log_prob": [-9.7, -10.2]}]})

    model: str = Field(description="Model name.", examples=["two_moons"])
    version: int = Field(description="Model version that answered.", examples=[1])
    columns: list[str] | None = Field(
        None, exclude_if=lambda v: v is None, examples=[["mu", "sigma", "var"]],
        description="Model-language targets: the name of each column of samples.")
    samples: list[list[float]] = Field(description="n rows of the model's dimension (or of its "
                                       "columns).",
                                       examples=[[[0.1, 0.9], [1.8, -0.2], [-0.7, 0.6]]])
    log_prob: list[float] = Field(description="log q(x) of each sample (in the constrained "
                                  "space for a model-language target).",
                                  examples=[[-1.1, -0.9, -1.6]])
    target_log_prob: list[float] | None = Field(
        None, exclude_if=lambda v: v is None, examples=[[-9.7, -10.2, -11.0]],
        description="Model-language targets: the model's log density at each sample.")
    diagnostics: Diagnostics | None = Field(
        None, exclude_if=lambda v: v is None,
        description="With diagnose=true: these draws' importance diagnostics against the model "
                    "(for an amortized posterior: whether to trust it for this observation).",
        examples=[{"pareto_k": 0.31, "max_weight": 2.4, "ess_fraction": 0.96,
                   "outside_support": 0.0, "moment_shift": 0.011, "verdict": "ok",
                   "reasons": []}])


# ---------------------------------------------------------------------------------- models
#: The issue's example model, used in the examples of the model-language schemas.
EIGHT_SCHOOLS: dict[str, Any] = {
    "params": {"mu": {}, "tau": {"lower": 0}, "theta_tilde": {"shape": [8]}},
    "data": {"y": [28, 8, -3, 7, -1, 1, 18, 12], "sigma": [15, 10, 16, 11, 9, 11, 10, 18]},
    "log_prob": ["normal_lpdf(mu, 0, 5)", "cauchy_lpdf(tau, 0, 5)",
                 "normal_lpdf(theta_tilde, 0, 1)", "normal_lpdf(y, mu + tau * theta_tilde, sigma)"],
    "derived": {"theta": "mu + tau * theta_tilde"}}


def _absent(value: object) -> bool:
    return value is None


class Diagnostics(BaseModel):
    """Whether a fit can be trusted, as a verdict with its reasons and the measures behind them:
    for a variational fit, Pareto-smoothed importance sampling k̂, the ESS fraction and the share
    of samples in spline tails; for a density fit, the held-out log-likelihood against the data's
    own Gaussian, the latent space's distance to a standard normal, and columns of few distinct
    values."""

    model_config = ConfigDict(extra="allow")  # new measures pass through

    pareto_k: float | None = Field(
        None, exclude_if=_absent, description="PSIS k̂ of the importance weights (Vehtari et "
        "al.); below 0.7 is good.", examples=[0.41])
    ess_fraction: float | None = Field(
        None, exclude_if=_absent, description="Effective sample size of the importance weights, "
        "as a share of the samples.", examples=[0.83])
    tail_fraction: float | None = Field(
        None, exclude_if=_absent, description="Share of samples where a spline layer is the "
        "identity (outside its bound).", examples=[0.0])
    missing_mass: float | None = Field(
        None, exclude_if=_absent,
        description="Share of the target's mass that q misses and a heavy-tailed proposal "
        "around the fit's Gaussian start finds (tails lighter than the target's, or a mode q did "
        "not find); above 0.01, beyond twice missing_mass_se, is not ok.", examples=[0.002])
    missing_mass_se: float | None = Field(
        None, exclude_if=_absent, description="Standard error of missing_mass (delta method; it "
        "errs large).", examples=[0.0015])
    moment_shift: float | None = Field(
        None, exclude_if=_absent,
        description="Largest move importance weighting makes to a mean (in sd) or an sd "
        "(ratio - 1) of q's samples: the raw samples' own error; above 0.05 is not ok.",
        examples=[0.012])
    gain_over_gaussian: float | None = Field(
        None, exclude_if=_absent,
        description="Density fits: the flow's mean log-likelihood per held-out row minus "
        "that of a Gaussian with the training rows' mean and covariance, in nats; below zero "
        "(beyond gain_se) is not ok.", examples=[0.41])
    outlying_rows: int | None = Field(
        None, exclude_if=_absent,
        description="Density fits: held-out rows beyond where the flow's own samples go "
        "(0.1 % level over the rows): its tails, or a sparse region, are too thin there; any "
        "is not ok.", examples=[0])
    latent_ks: float | None = Field(
        None, exclude_if=_absent,
        description="Density fits: the largest Kolmogorov-Smirnov distance of a latent "
        "coordinate of the held-out rows to a standard normal; a good fit's is near zero.",
        examples=[0.03])
    discrete_columns: list[int] | None = Field(
        None, exclude_if=_absent,
        description="Density fits: data columns of few distinct values, on which a "
        "continuous density is degenerate.", examples=[[]])
    verdict: Literal["ok", "check", "unreliable"] = Field(
        description="ok: trust it; check: look closer; unreliable: do not use it as is.",
        examples=["ok"])
    reasons: list[str] = Field(default_factory=list, description="Why the verdict is not ok.",
                               examples=[["pareto_k 0.9 > 0.7: q misses part of the target"]])


_DIAGNOSTICS = {"pareto_k": 0.41, "ess_fraction": 0.93, "tail_fraction": 0.0,
                "moment_shift": 0.012, "verdict": "ok",
                "reasons": []}


def diagnostics_of(summary: object) -> Diagnostics | None:
    """The ``Diagnostics`` of a training summary, when it has them in the documented shape."""
    found = diagnostics(summary if isinstance(summary, dict) else None)
    try:
        return None if found is None else Diagnostics.model_validate(found)
    except ValueError:  # not the shape we document: leave it in the raw metadata only
        return None


class TargetPublic(BaseModel):
    """The model-language target a model was fit to, as its answers name it."""

    params: dict[str, Any] = Field(description="Each parameter's declaration (shape, bounds, "
                                   "constraint).", examples=[EIGHT_SCHOOLS["params"]])
    derived: dict[str, str] = Field(description="Each derived quantity's expression.",
                                    examples=[EIGHT_SCHOOLS["derived"]])
    param_columns: list[str] = Field(description="Columns of the parameters, in the order "
                                     "/log_prob takes rows x.",
                                     examples=[["mu", "tau", "theta_tilde[0]", "…"]])
    derived_columns: list[str] = Field(description="Columns of the derived quantities.",
                                       examples=[["theta[0]", "…", "theta[7]"]])
    columns: list[str] = Field(description="Every column of a /sample answer: parameters, then "
                               "derived quantities.",
                               examples=[["mu", "tau", "theta_tilde[0]", "…", "theta[7]"]])


class ModelVersionPublic(BaseModel):
    """One stored version of a model."""

    version: int = Field(description="Version number (positive integer).", examples=[1])
    created: datetime = Field(description="When the version's file was written (UTC).",
                              examples=["2026-11-21T05:00:00Z"])
    size_bytes: int = Field(description="Size of model.safetensors.", examples=[48512])
    hash: str = Field(description="Content hash stored in the artifact.",
                      examples=["sha256:9f2c…"])
    dim: int = Field(description="Dimension of the data.", examples=[2])
    context_dim: int = Field(description="Dimension of the context; 0: unconditional.",
                             examples=[0])
    spec: dict[str, Any] = Field(description="Normalized flow spec the model was built from.",
                                 examples=[{"dim": 2, "context_dim": 0, "dtype": "float32",
                                            "base": {"type": "normal"}, "layers": []}])
    metadata: dict[str, Any] = Field(
        description="The artifact's other metadata (training summary, metrics, …), JSON values "
                    "decoded.", examples=[{"training": {"objective": "density", "steps": 2000}}])
    diagnostics: Diagnostics | None = Field(
        None, exclude_if=_absent, description="The fit's diagnostics, from the training summary; "
        "present for fits that have them (variational fits, and density fits from this version "
        "on).", examples=[_DIAGNOSTICS])
    cost: dict[Literal["log_prob", "sample"], Literal["one pass", "iterative", "ode"]] = Field(
        description="What its two operations cost: one pass per layer, an iterative solve "
                    "(fixed point, root finding, sequential features) or an ODE solve.",
        examples=[{"log_prob": "one pass", "sample": "one pass"}])
    log_prob_exact: bool = Field(
        description="Whether /log_prob answers are exact (to the solvers' stated tolerance); "
                    "false for a residual flow above its exact_dim, whose log-determinant is "
                    "an unbiased estimate.", examples=[True])
    target: TargetPublic | None = Field(
        None, exclude_if=_absent, description="The model-language target the model was fit to, "
        "when it was: /sample and /log_prob then speak its constrained space, with these "
        "columns.", examples=[None])
    artifact_url: str = Field(description="Where to download the file.",
                              examples=["/models/two_moons/versions/1/artifact"])


class ModelPublic(BaseModel):
    """A model with all its versions."""

    name: str = Field(description="Model name.", examples=["two_moons"])
    latest: int = Field(description="Highest version; what a request without version gets.",
                        examples=[2])
    versions: list[ModelVersionPublic] = Field(description="Every version, ascending.")


class ModelSummary(BaseModel):
    """A model in the list."""

    name: str = Field(description="Model name.", examples=["two_moons"])
    versions: list[int] = Field(description="Its versions, ascending.", examples=[[1, 2]])
    latest: int = Field(description="Highest version.", examples=[2])
    dim: int = Field(description="Dimension of the latest version.", examples=[2])
    context_dim: int = Field(description="Context dimension of the latest version.",
                             examples=[0])


class ModelsPublic(BaseModel):
    """Every model in the store."""

    data: list[ModelSummary] = Field(description="Models, by name.")
    count: int = Field(description="Number of models.", examples=[5])


class ModelUploaded(BaseModel):
    """The result of an upload."""

    name: str = Field(description="Model name.", examples=["my_flow"])
    version: int = Field(description="Version it was stored as.", examples=[3])
    hash: str = Field(description="Content hash of the artifact.", examples=["sha256:9f2c…"])
    dim: int = Field(description="Dimension of the data.", examples=[2])
    context_dim: int = Field(description="Dimension of the context.", examples=[0])
    artifact_url: str = Field(description="Where to download it.",
                              examples=["/models/my_flow/versions/3/artifact"])


# ---------------------------------------------------------------------------------- jobs
_TS = "UTC time"
_WHEN = "2026-11-21T05:00:00Z"


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class TrainingOptions(BaseModel):
    """How long and how to train. Only the options given are passed on; the others take nfcore's
    defaults (``service.training.requests``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "description": "How long and how to train. Only the options given are passed on; the "
                       f"others take nfcore's defaults. The budget: {BUDGET_RULES}"})

    steps: int | None = Field(None, ge=1, description=f"Optimizer steps. {BUDGET_RULES}",
                              examples=[2000])
    epochs: int | None = Field(None, ge=1, description="Passes over the training rows, instead of "
                               "steps (density jobs only); as steps in the budget rules.",
                               examples=[None])
    max_seconds: float | None = Field(None, gt=0, description=f"Time budget in seconds. "
                                      f"{BUDGET_RULES}", examples=[90.0])
    batch_size: int | None = Field(None, ge=1, le=65536, description=f"Rows (or samples) per "
                                   f"step; default {default_text('batch_size')}.", examples=[256])
    lr: float | None = Field(None, gt=0, le=10, description=f"AdamW learning rate; default "
                             f"{default_text('lr')}.", examples=[1e-3])
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description=f"Seed of the initial weights, "
                             f"the data split and the batches: same seed, same data, same model; "
                             f"default {default_text('seed')}.", examples=[0])
    validation_fraction: float | None = Field(
        None, ge=0, lt=1, description=f"Held-out share of the data for val_loss and early "
        f"stopping (density jobs); default {default_text('validation_fraction')}.",
        examples=[0.1])
    anneal_steps: int | None = Field(None, ge=0, description=f"Steps over which the target's "
                                     f"weight rises to 1 (variational jobs); default "
                                     f"{default_text('anneal_steps')}.", examples=[0])
    loss: Literal["likelihood", "flow_matching"] | None = Field(
        None, description="Density jobs: maximum likelihood, or flow matching (conditional OT "
                          "paths; for a flow whose last layer is a cnf). Default: flow matching "
                          "for such a flow, likelihood otherwise.", examples=["flow_matching"])

    @field_validator("lr", "max_seconds")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("expected a finite number")
        return v


class DensityObjective(BaseModel):
    """Maximum likelihood on data: an uploaded dataset, or rows inline."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["density"] = Field(description="Maximum likelihood.", examples=["density"])
    dataset: str | None = Field(None, description="Id from POST /datasets.",
                                examples=["ds_0123456789abcdef0123456789abcdef"])
    data: Any = Field(None, description="Rows inline, e.g. [[0.1, 2.0], …] (small data only).",
                      examples=[None])
    context: Any = Field(None, description="Conditioning rows for inline data (conditional flows).",
                         examples=[None])

    @model_validator(mode="after")
    def _one_source(self) -> DensityObjective:
        if (self.dataset is None) == (self.data is None):
            raise ValueError("give exactly one of 'dataset' (an id from POST /datasets) or 'data' "
                             "(rows inline)")
        if self.context is not None and self.data is None:
            raise ValueError("'context' goes with inline 'data'; a dataset carries its own")
        return self


class BuiltinTarget(BaseModel):
    """A built-in or plugin target by name, e.g. ``{"builtin": "U1"}``."""

    model_config = ConfigDict(extra="forbid")

    builtin: str = Field(description="U1-U4, banana, funnel, gaussian_mixture, or a plugin.",
                         examples=["U1"])
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options, e.g. "
                                    "{\"dim\": 5} for the funnel.", examples=[{}])


class ExpressionTarget(BaseModel):
    """An unnormalized log density written as an expression in ``z`` (a whitelisted grammar)."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(ge=1, description="Dimension of z.", examples=[2])
    log_prob: str = Field(max_length=20000, description="Expression for log p~(z).",
                          examples=["-0.5*sum(z**2)"])
    constants: dict[str, Any] = Field(default_factory=dict, description="Named constants.",
                                      examples=[{"y": [1.0, 2.0]}])


class ModelLanguageTarget(BaseModel):
    """A Bayesian model in the model language (``nfcore.targets.model`` is its contract): named
    parameters with shapes and constraints, data, ``log_prob`` terms each summed like Stan's
    ``target +=``, and derived quantities. The flow's ``dim`` is the number of unconstrained reals
    (a simplex of k entries has k - 1). A model fit to it answers /sample and /log_prob in the
    constrained space with named columns."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EIGHT_SCHOOLS]})

    params: dict[str, Any] = Field(description="Name -> {shape: [] | [k] | [k, m], lower, upper, "
                                   "constraint: ordered | simplex}; every key optional, {} is a "
                                   "real scalar.", examples=[EIGHT_SCHOOLS["params"]])
    data: dict[str, Any] | None = Field(None, description="Name -> number or nested list; lists "
                                        "of JSON integers are integer data that may index "
                                        "(0-based).", examples=[EIGHT_SCHOOLS["data"]])
    log_prob: str | list[str] = Field(description="One expression or a list of terms; each term "
                                      "is summed over its elements and the sums are added.",
                                      examples=[EIGHT_SCHOOLS["log_prob"]])
    derived: dict[str, str] | None = Field(None, description="Name -> expression computed per "
                                           "sample and returned with the samples; not part of "
                                           "the density.", examples=[EIGHT_SCHOOLS["derived"]])
    context: dict[str, Any] | None = Field(None, description="Observed values that change from "
                                           "one fit to the next (amortized fits): name -> "
                                           "{shape}; a context row is their values flattened "
                                           "in this order.", examples=[None])


def _target_kind(value: Any) -> str:
    """Which kind of target a request's ``target`` is (a dict), or a parsed one (a model)."""
    if isinstance(value, BaseModel):
        return {BuiltinTarget: "builtin", ModelLanguageTarget: "model"}.get(type(value),
                                                                            "expression")
    if isinstance(value, dict):
        return "builtin" if "builtin" in value else "model" if "params" in value else "expression"
    return "expression"


class VariationalObjective(BaseModel):
    """Reverse KL against an unnormalized log density: a built-in, an expression over ``z`` or a
    model in the model language."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["variational"] = Field(description="Reverse KL.", examples=["variational"])
    target: Annotated[Annotated[BuiltinTarget, Tag("builtin")]
                      | Annotated[ExpressionTarget, Tag("expression")]
                      | Annotated[ModelLanguageTarget, Tag("model")],
                      Discriminator(_target_kind)] = Field(
        description="The unnormalized log density: {builtin}, {dim, log_prob, constants} over z, "
                    "or a model {params, data, log_prob, derived}.",
        examples=[{"builtin": "U1"}, EIGHT_SCHOOLS])
    contexts: Any = Field(None, description="For a model with a 'context' block (an amortized "
                          "fit, with a flow of that context_dim): context rows inline [[…], …] "
                          "or {\"dataset\": id}, whose columns are the context rows.",
                          examples=[None])


Objective = Annotated[DensityObjective | VariationalObjective, Field(discriminator="kind")]


class JobCreate(BaseModel):
    """``POST /train``: what to train and how."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Model name; the job publishes its next "
                      "version.", examples=["two_moons"])
    flow: dict[str, Any] = Field(description="Flow spec (layers or a preset).",
                                 examples=[{"preset": "nsf", "dim": 2, "transforms": 4}])
    objective: Objective = Field(description="What to fit: data, or a target.",
                                 examples=[{"kind": "variational", "target": {"builtin": "U1"}}])
    training: TrainingOptions = Field(default_factory=TrainingOptions,
                                      description="How long and how to train.",
                                      examples=[{"max_seconds": 90}])


class JobAccepted(BaseModel):
    """The answer to ``POST /train`` (202)."""

    job_id: str = Field(description="Id of the new job.",
                        examples=["job_0123456789abcdef0123456789abcdef"])
    status: JobStatus = Field(description="Always 'queued' at first.", examples=["queued"])
    status_url: str = Field(description="Where to poll the job (also the Location header).",
                            examples=["/jobs/job_0123456789abcdef0123456789abcdef"])


class ProgressPublic(BaseModel):
    """Where a job stands; written by its worker about once a second while it runs."""

    step: int | None = Field(None, description="Steps done.", examples=[1200])
    total: int | None = Field(None, description="Steps planned; null under a time budget alone, "
                              "which has no step count.", examples=[2000])
    loss: float | None = Field(None, description="Latest training loss (mean since the previous "
                               "report).", examples=[1.234])
    val_loss: float | None = Field(None, description="Latest validation loss (density jobs).",
                                   examples=[1.251])
    elapsed: float | None = Field(None, description="Seconds of training so far (across "
                                  "attempts).", examples=[12.5])
    eta: float | None = Field(None, description="Estimated seconds left; under a time budget "
                              "alone, what is left of it.", examples=[8.3])


class JobResult(BaseModel):
    """The model version a succeeded job published, and its fit's diagnostics."""

    model: str = Field(description="Model name.", examples=["two_moons"])
    version: int = Field(description="The new version, servable at once.", examples=[3])
    diagnostics: Diagnostics | None = Field(
        None, exclude_if=_absent, description="Whether the fit can be trusted: a verdict, its "
        "reasons and the measures behind them (k̂ and ESS for a variational fit; the held-out "
        "gain over a Gaussian and the latent's distance to a normal for a density fit).",
        examples=[_DIAGNOSTICS])


class JobPublic(BaseModel):
    """A job as ``GET /jobs/{id}`` shows it."""

    id: str = Field(description="Job id.", examples=["job_0123456789abcdef0123456789abcdef"])
    name: str = Field(description="Model name the job publishes to.", examples=["two_moons"])
    kind: Literal["density", "variational"] = Field(description="Objective kind.",
                                                    examples=["density"])
    status: JobStatus = Field(description="Lifecycle state.", examples=["running"])
    cancel_requested: bool = Field(description="DELETE was called; a running job stops within a "
                                   "step.", examples=[False])
    created_at: datetime = Field(description=f"{_TS} of submission.", examples=[_WHEN])
    started_at: datetime | None = Field(description=f"{_TS} a worker first started it.",
                                        examples=[_WHEN])
    finished_at: datetime | None = Field(description=f"{_TS} it ended.", examples=[None])
    heartbeat_at: datetime | None = Field(description=f"{_TS} of its worker's last heartbeat.",
                                          examples=[_WHEN])
    attempts: int = Field(description="Times a worker started it.", examples=[1])
    retries: int = Field(description="Times it was re-queued after its worker died.",
                         examples=[0])
    resumed_from: int | None = Field(None, description="Checkpoint step the latest attempt resumed "
                                     "from, if any.", examples=[None])
    progress: ProgressPublic = Field(description="Step, total, losses, elapsed and eta.",
                                     examples=[{"step": 1200, "total": 2000, "loss": 1.234,
                                                "val_loss": 1.251, "elapsed": 12.5, "eta": 8.3}])
    result: JobResult | None = Field(description="The published model and its diagnostics, "
                                     "once succeeded.", examples=[None])
    error: str | None = Field(description="Why it failed.", examples=[None])
    objective: dict[str, Any] = Field(description="What it fits: dataset id or target.",
                                      examples=[{"kind": "density", "dataset": "ds_0123"}])
    training: dict[str, Any] = Field(description="Training options as given; the others take "
                                     "their defaults (see POST /train).",
                                     examples=[{"steps": 2000, "batch_size": 256}])
    spec: dict[str, Any] = Field(description="The normalized flow spec.",
                                 examples=[{"dim": 2, "context_dim": 0, "dtype": "float32",
                                            "base": {"type": "normal"}, "layers": []}])


class JobsPublic(BaseModel):
    """Jobs, newest first."""

    data: list[JobPublic] = Field(description="This page of jobs.", examples=[[]])
    count: int = Field(description="Jobs matching the filters in all.", examples=[42])


class DatasetPublic(BaseModel):
    """An uploaded dataset."""

    id: str = Field(description="Dataset id, for objective.dataset.",
                    examples=["ds_0123456789abcdef0123456789abcdef"])
    rows: int = Field(description="Rows (points).", examples=[10000])
    dim: int = Field(description="Columns of x; must equal the flow's dim.", examples=[2])
    context_dim: int = Field(description="Columns of the context (0 if none).", examples=[0])
    format: str = Field(description="csv, npy, safetensors, or inline.", examples=["csv"])
    dtype: str = Field(description="Stored dtype of x.", examples=["float64"])
    filename: str | None = Field(description="Uploaded file name.", examples=["moons.csv"])
    bytes: int = Field(description="Size of the stored safetensors file.", examples=[160104])
    sha256: str = Field(description="Hash of the stored file.", examples=["sha256:9f…"])
    created_at: datetime = Field(description=f"{_TS} of the upload.", examples=[_WHEN])


def job_public(job: JobRecord) -> JobPublic:
    result = (JobResult(model=job.result_name, version=job.result_version,
                        diagnostics=diagnostics_of(job.summary))
              if job.result_name is not None and job.result_version is not None else None)
    return JobPublic(
        id=job.id, name=job.name, kind=job.kind, status=job.status,
        cancel_requested=bool(job.cancel_requested), created_at=_ts(job.created_at),
        started_at=_ts(job.started_at), finished_at=_ts(job.finished_at),
        heartbeat_at=_ts(job.heartbeat_at), attempts=job.attempts or 0, retries=job.retries or 0,
        resumed_from=job.resumed_from,
        progress=ProgressPublic(step=job.step, total=job.total, loss=job.loss,
                                val_loss=job.val_loss, elapsed=job.elapsed, eta=job.eta),
        result=result, error=job.error, objective=job.objective, training=job.training,
        spec=job.spec)


def dataset_public(row: DatasetRecord) -> DatasetPublic:
    return DatasetPublic(id=row.id, rows=row.rows, dim=row.dim, context_dim=row.context_dim,
                         format=row.format, dtype=row.dtype, filename=row.filename,
                         bytes=row.bytes, sha256=row.sha256, created_at=_ts(row.created_at))


# ---------------------------------------------------------------------------------- health
class CheckPublic(BaseModel):
    """One readiness check."""

    name: str = Field(description="What was checked.", examples=["model_store"])
    ok: bool = Field(description="Whether it passed.", examples=[True])
    detail: str = Field("", description="Why not, or a note.", examples=["5 models"])


class HealthPublic(BaseModel):
    """Liveness or readiness."""

    status: Literal["ok", "unavailable"] = Field(description="Overall state.", examples=["ok"])
    checks: list[CheckPublic] = Field(default_factory=list,
                                      description="Individual checks (readiness only).")
