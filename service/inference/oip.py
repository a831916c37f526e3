"""The Open Inference Protocol v2 (KServe's v2, Triton's HTTP/REST) over the same data plane as the
native API: framework-free decoding, checks and encoding of ``POST /v2/models/{name}/infer``, and
the metadata and readiness answers.

A model takes the input ``x`` (FP32 or FP64, ``[N, dim]``) and, for a conditional model,
``context`` (``[N or 1, context_dim]``); the request's ``parameters`` pick the operation:
``{"op": "log_prob"}`` (the default) answers ``log_prob`` (``[N]``), ``{"op": "sample", "n": …,
"seed": …}`` answers ``samples`` (``[n, dim]``) and ``log_prob`` (``[n]``). ``timeout_ms`` (or
Triton's ``timeout``, in microseconds) bounds the request's wait, as on the native routes.

Triton's binary tensor data extension is supported both ways: with the header
``Inference-Header-Content-Length: L``, the first L bytes of the body are the JSON request and
each input with ``parameters.binary_data_size`` takes its raw little-endian bytes, in order, from
the rest. An output asked with ``parameters.binary_data`` (or every output, with the request
parameter ``binary_data_output``) comes back the same way. Scoring and sampling go through
``DataPlane.score``/``draw``: the same limits, batcher, deadlines and metrics as ``/log_prob``
and ``/sample``.

Example:
    >>> body = b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0, 1]}]}'
    >>> req = decode_infer(body, None)
    >>> req.op, req.arrays["x"].shape, req.arrays["x"].dtype
    ('log_prob', (1, 2), dtype('float32'))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InvalidInput
from ..store import ModelVersionInfo
from . import constrained
from .protocol import DataPlane, validation_message

__all__ = ["HEADER_LENGTH", "InferRequest", "InferResponse", "InferParameters", "TensorInput",
           "TensorOutput", "RequestedOutput", "ModelMetadata", "ServerMetadata", "TensorMetadata",
           "OipError", "Decoded", "decode_infer", "infer", "model_metadata", "ENCODED"]

#: The header of Triton's binary tensor data extension (request and answer).
HEADER_LENGTH = "Inference-Header-Content-Length"

_DTYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
_OIP_NAME = {"float32": "FP32", "float64": "FP64"}
#: Outputs of each operation, in answer order.
_OUTPUTS = {"log_prob": ("log_prob",), "sample": ("samples", "log_prob")}
_INPUTS = {"log_prob": ("x", "context"), "sample": ("context",)}


# ---------------------------------------------------------------------------------- schemas
class InferParameters(BaseModel):
    """Request parameters. Other parameters (Triton clients send ``priority`` and others) are
    accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    op: Literal["log_prob", "sample"] = Field(
        "log_prob", description="log_prob: score the rows of x; sample: draw n samples.")
    n: int | None = Field(None, ge=1, description="Samples to draw (op sample).", examples=[4])
    seed: int | None = Field(None, ge=0, lt=2**63, description="Seed of the samples' noise.",
                             examples=[0])
    timeout_ms: float | None = Field(
        None, gt=0, description="Drop the request (408) once it has waited this long.")
    timeout: int | None = Field(
        None, ge=0, description="Triton's per-request timeout, in microseconds; 0: none.")
    binary_data_output: bool = Field(
        False, description="Every output as binary data after the JSON header.")


class TensorInput(BaseModel):
    """One input tensor: its data inline (flat or nested, row-major) or, with
    ``parameters.binary_data_size``, as raw bytes after the JSON header."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="x or context.", examples=["x"])
    shape: list[int] = Field(description="Tensor shape.", examples=[[2, 2]])
    datatype: str = Field(description="FP32 or FP64.", examples=["FP32"])
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size, if binary.")
    data: list[Any] | None = Field(None, description="Row-major values, flat or nested.",
                                   examples=[[0.5, -0.25, 1.0, 0.3]])


class RequestedOutput(BaseModel):
    """An output the client asks for (all of the operation's when the list is absent)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="log_prob or samples.", examples=["log_prob"])
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data: true for raw bytes after the JSON header.")


class InferRequest(BaseModel):
    """An inference request (the JSON part, when binary tensors follow it)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="Echoed in the answer.", examples=["r1"])
    parameters: InferParameters | None = Field(None, description="op, n, seed, timeout_ms.")
    inputs: list[TensorInput] = Field(
        default_factory=list, description="x (op log_prob) and, for a conditional model, context.",
        examples=[[{"name": "x", "shape": [2, 2], "datatype": "FP32",
                    "data": [0.5, -0.25, 1.0, 0.3]}]])
    outputs: list[RequestedOutput] | None = Field(None, description="Outputs wanted.")


class TensorOutput(BaseModel):
    """One output tensor: ``data`` inline, or ``parameters.binary_data_size`` bytes after the JSON
    header."""

    name: str = Field(examples=["log_prob"])
    shape: list[int] = Field(examples=[[2]])
    datatype: str = Field(examples=["FP32"])
    parameters: dict[str, Any] | None = None
    data: list[float] | None = Field(None, examples=[[-1.42, -2.07]])


class InferResponse(BaseModel):
    """An inference answer."""

    model_name: str = Field(examples=["two_moons"])
    model_version: str = Field(examples=["1"])
    id: str | None = Field(None, examples=["r1"])
    parameters: dict[str, Any] | None = Field(
        None, description="exact: whether log_prob is exact or an unbiased estimate.")
    outputs: list[TensorOutput]


class TensorMetadata(BaseModel):
    """Name, datatype and shape (-1: any length) of a model's input or output."""

    name: str = Field(examples=["x"])
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(examples=[[-1, 2]])


class ModelMetadata(BaseModel):
    """A model's metadata."""

    name: str = Field(examples=["two_moons"])
    versions: list[str] = Field(examples=[["1", "2"]])
    platform: str = Field(examples=["nfserve"])
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = Field(
        None, description="dim, context_dim, log_prob_exact, version (the one described).")


class ServerMetadata(BaseModel):
    """The server's metadata."""

    name: str = Field(examples=["nfserve"])
    version: str = Field(examples=["0.1.0"])
    extensions: list[str] = Field(examples=[["binary_tensor_data"]])


class OipError(BaseModel):
    """Every error answer of the /v2 routes."""

    error: str = Field(description="What was wrong.", examples=["Unknown model 'nope'"])


# ---------------------------------------------------------------------------------- decoding
@dataclass
class Decoded:
    """A checked infer request: the operation, its arrays and how to send each output."""

    op: Literal["log_prob", "sample"]
    arrays: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]]  # (name, binary) in answer order
    id: str | None = None
    n: int | None = None
    seed: int | None = None
    timeout_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    try:
        size = int(header_length)
    except ValueError:
        raise InvalidInput(f"Invalid {HEADER_LENGTH} header {header_length!r}") from None
    if not 0 <= size <= len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {size}; the body has {len(body)} bytes")
    return body[:size], memoryview(body)[size:]


def _array(tensor: TensorInput, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """The input's array and the offset of the next binary tensor."""
    what = f"input {tensor.name!r}"
    dtype = _DTYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidInput(f"{what} has datatype {tensor.datatype!r}; send FP32 or FP64")
    if any(d < 0 for d in tensor.shape) or len(tensor.shape) > 2:
        raise InvalidInput(f"{what} has shape {tensor.shape}; expected [N, columns]")
    count = math.prod(tensor.shape)
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if tensor.data is not None:
            raise InvalidInput(f"{what} has both data and binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"{what}: binary_data_size must be a non-negative integer")
        if size != count * dtype.itemsize:
            raise InvalidInput(f"{what}: binary_data_size {size} does not match shape "
                               f"{tensor.shape} of {tensor.datatype} ({count * dtype.itemsize} "
                               f"bytes)")
        if offset + size > len(binary):
            raise InvalidInput(f"{what}: the body ends before its {size} bytes of binary data")
        arr = np.frombuffer(binary[offset:offset + size], dtype=dtype).copy()  # writable
        offset += size
    else:
        if tensor.data is None:
            raise InvalidInput(f"{what} has neither data nor binary_data_size")
        try:
            arr = np.asarray(tensor.data, dtype=dtype)
        except (ValueError, TypeError):
            raise InvalidInput(f"{what}: data must hold numbers only, flat or nested "
                               f"row-major") from None
        if arr.size != count:
            raise InvalidInput(f"{what} has {arr.size} values; shape {tensor.shape} needs "
                               f"{count}")
    return arr.reshape(tensor.shape), offset


def decode_infer(body: bytes, header_length: str | None) -> Decoded:
    """Parse and check an infer request (JSON, or JSON then binary tensors)."""
    header, binary = _split(body, header_length)
    if not header.strip():
        raise InvalidInput("Request body is empty; send an inference request (JSON)")
    try:
        req = InferRequest.model_validate_json(header)
    except ValidationError as e:
        raise InvalidInput(validation_message(e.errors())) from None
    params = req.parameters or InferParameters()
    op = params.op
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in req.inputs:
        if tensor.name not in _INPUTS[op]:
            raise InvalidInput(f"Unexpected input {tensor.name!r} for op {op!r}; expected "
                               f"{list(_INPUTS[op])}")
        if tensor.name in arrays:
            raise InvalidInput(f"Input {tensor.name!r} is given twice")
        arrays[tensor.name], offset = _array(tensor, binary, offset)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data after the JSON header "
                           f"belong to no input")
    if op == "log_prob" and "x" not in arrays:
        raise InvalidInput("op log_prob needs the input 'x' ([N, dim])")
    if op == "sample" and params.n is None:
        raise InvalidInput("op sample needs the parameter 'n'")
    if op == "log_prob" and (params.n is not None or params.seed is not None):
        raise InvalidInput("Parameters 'n' and 'seed' are for op sample only")
    if req.outputs is None:
        outputs = [(name, params.binary_data_output) for name in _OUTPUTS[op]]
    else:
        outputs = []
        for out in req.outputs:
            if out.name not in _OUTPUTS[op]:
                raise InvalidInput(f"Unknown output {out.name!r} for op {op!r}; it has "
                                   f"{list(_OUTPUTS[op])}")
            binary_out = (out.parameters or {}).get("binary_data", params.binary_data_output)
            if not isinstance(binary_out, bool):
                raise InvalidInput(f"Output {out.name!r}: binary_data must be true or false")
            outputs.append((out.name, binary_out))
    timeout_ms = params.timeout_ms
    if timeout_ms is None and params.timeout:
        timeout_ms = params.timeout / 1000.0
    return Decoded(op=op, arrays=arrays, outputs=outputs, id=req.id, n=params.n,
                   seed=params.seed, timeout_ms=timeout_ms)


# ---------------------------------------------------------------------------------- encoding
#: An encoded answer: body, media type and the binary header's value (None for plain JSON).
ENCODED = tuple[bytes, str, int | None]


def _encode(name: str, version: int, req: Decoded, results: dict[str, np.ndarray],
            parameters: dict[str, Any] | None) -> ENCODED:
    outputs, blobs = [], []
    for out, binary in req.outputs:
        arr = results[out]
        item: dict[str, Any] = {"name": out, "datatype": _OIP_NAME[arr.dtype.name],
                                "shape": list(arr.shape)}
        if binary:
            blob = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = np.ascontiguousarray(arr).ravel()
        outputs.append(item)
    answer: dict[str, Any] = {"model_name": name, "model_version": str(version),
                              "outputs": outputs}
    if req.id is not None:
        answer["id"] = req.id
    if parameters:
        answer["parameters"] = parameters
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, "application/json", None
    return b"".join([header, *blobs]), "application/octet-stream", len(header)


async def infer(plane: DataPlane, name: str, version: int | None, body: bytes,
                header_length: str | None) -> ENCODED:
    """Answer one infer request through the data plane."""
    req = decode_infer(body, header_length)
    if req.op == "log_prob":
        model, log_prob = await plane.score(name, version, req.arrays["x"],
                                            req.arrays.get("context"), timeout_ms=req.timeout_ms)
        return _encode(model.name, model.version, req, {"log_prob": log_prob},
                       {"exact": model.flow.exact_log_prob})
    assert req.n is not None
    model, samples, log_q = await plane.draw(name, version, req.n, seed=req.seed,
                                             context=req.arrays.get("context"),
                                             timeout_ms=req.timeout_ms)
    return _encode(model.name, model.version, req, {"samples": samples, "log_prob": log_q}, None)


def model_metadata(info: ModelVersionInfo, versions: list[int]) -> ModelMetadata:
    """The metadata of one version (``versions``: every version of the model). A model fit to a
    model-language target takes and answers its constrained columns: ``x`` has its parameter
    columns, ``samples`` every column (parameters, then derived quantities)."""
    spec = info.spec
    dim, context_dim = spec["dim"], spec.get("context_dim", 0)
    dtype = _OIP_NAME.get(spec.get("dtype", "float32"), "FP32")
    target = constrained.target_of(info.metadata, dim)
    x_dim = len(target.param_columns) if target is not None else dim
    out_dim = len(target.columns) if target is not None else dim
    inputs = [TensorMetadata(name="x", datatype=dtype, shape=[-1, x_dim])]
    if context_dim:
        inputs.append(TensorMetadata(name="context", datatype=dtype, shape=[-1, context_dim]))
    outputs = [TensorMetadata(name="log_prob", datatype=dtype, shape=[-1]),
               TensorMetadata(name="samples", datatype=dtype, shape=[-1, out_dim])]
    return ModelMetadata(
        name=info.name, versions=[str(v) for v in versions], platform="nfserve", inputs=inputs,
        outputs=outputs, parameters={"version": str(info.version), "dim": dim,
                                     "context_dim": context_dim,
                                     "log_prob_exact": info.log_prob_exact})
