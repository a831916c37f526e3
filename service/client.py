"""Python client of the nfserve HTTP API, sync (``Client``) and async (``AsyncClient``), on httpx.

Arrays go in and come out as numpy. Requests with more than ``binary_rows`` rows (and samples with
``n`` above it) travel as safetensors instead of JSON. Every error answer raises a typed
``NFServeError`` subclass that carries the server's status code and message. It needs httpx,
numpy, safetensors and orjson only (``pip install nfserve`` without extras), and shares the wire
contract (``service.wire``) with the server. ``AsyncClient`` has every method of ``Client``.

Example:
    >>> from service.client import Client
    >>> with Client("http://127.0.0.1:8000") as nf:          # doctest: +SKIP
    ...     lp = nf.log_prob("two_moons", [[0.0, 0.5], [1.0, -0.3]])
    ...     x, log_q = nf.sample("two_moons", 1000, seed=0)
    ...     d = nf.draws("eight_schools", 1000, seed=0)   # a model-language fit: named columns
    ...     d.columns[:2], d.named()["tau"].shape, d.log_weights.shape
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .wire import JSON, LOG_PROB, OCTET_STREAM, SAMPLE, STATUS, ErrorKind, JobStatus

__all__ = [
    "Client", "AsyncClient", "Draws", "NFServeError", "InvalidInput", "NotFound", "Conflict",
    "PayloadTooLarge", "Unauthorized", "Forbidden", "Overloaded", "DeadlineExceeded", "ServerError",
]


# ---------------------------------------------------------------------------------- errors
class NFServeError(Exception):
    """An error answer from the server (or an unreadable answer)."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class InvalidInput(NFServeError):
    """422/400/415: bad JSON, shape, dimension, empty or non-finite input, invalid upload."""


class NotFound(NFServeError):
    """404: unknown model or version."""


class Conflict(NFServeError):
    """409: e.g. the version already exists."""


class PayloadTooLarge(NFServeError):
    """413: over the row, n or body-size limit."""


class Unauthorized(NFServeError):
    """401: missing or invalid API key."""


class Forbidden(NFServeError):
    """403: the key lacks the scope."""


class Overloaded(NFServeError):
    """503: queue full or deadline passed; retry later."""


class DeadlineExceeded(NFServeError):
    """408: the request's own ``timeout_ms`` passed before it had a result."""


class ServerError(NFServeError):
    """Any other 5xx."""


_BY_KIND: dict[ErrorKind, type[NFServeError]] = {
    ErrorKind.INVALID_INPUT: InvalidInput, ErrorKind.UNSUPPORTED_MEDIA_TYPE: InvalidInput,
    ErrorKind.NOT_FOUND: NotFound, ErrorKind.CONFLICT: Conflict,
    ErrorKind.PAYLOAD_TOO_LARGE: PayloadTooLarge, ErrorKind.UNAUTHORIZED: Unauthorized,
    ErrorKind.FORBIDDEN: Forbidden, ErrorKind.UNAVAILABLE: Overloaded,
    ErrorKind.OVERLOADED: Overloaded, ErrorKind.DEADLINE_EXCEEDED: DeadlineExceeded,
}
_ERRORS: dict[int, type[NFServeError]] = {
    400: InvalidInput, **{STATUS[kind]: cls for kind, cls in _BY_KIND.items()}}


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text or response.reason_phrase
    status = response.status_code
    cls = _ERRORS.get(status, ServerError if status >= 500 else NFServeError)
    raise cls(status, str(detail))


# ---------------------------------------------------------------------------------- answers
@dataclass
class Draws:
    """A /sample answer with everything in it.

    For a model fit to a model-language target, ``samples`` are in its constrained space with one
    column per name in ``columns`` (parameters, then derived quantities), ``log_prob`` is log q
    there and ``target_log_prob`` the model's log density at the same points. For a plain flow,
    ``columns`` and ``target_log_prob`` are None.
    """

    samples: np.ndarray
    log_prob: np.ndarray
    columns: list[str] | None = None
    target_log_prob: np.ndarray | None = None
    #: With ``diagnose=True``: these draws' importance diagnostics against the model (``pareto_k``,
    #: ``ess_fraction``, ``moment_shift``, ``verdict``, ``reasons``, …).
    diagnostics: dict[str, Any] | None = None

    @property
    def log_weights(self) -> np.ndarray:
        """Importance log-weights ``target_log_prob - log_prob`` (model-language targets)."""
        if self.target_log_prob is None:
            raise ValueError("This model was not fit to a model-language target: no weights")
        return self.target_log_prob - self.log_prob

    def named(self) -> dict[str, np.ndarray]:
        """Each column by name (``{"mu": (n,), "theta[0]": (n,), …}``); plain flows: ``x0``, …"""
        names = self.columns or [f"x{i}" for i in range(self.samples.shape[1])]
        return {name: self.samples[:, i] for i, name in enumerate(names)}


# ---------------------------------------------------------------------------------- requests
@dataclass
class _Call:
    """One HTTP call, described independently of sync/async, and how to read its answer."""

    method: str
    url: str
    parse: Callable[[httpx.Response], Any]
    params: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _rows(value: Any, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"Expected {what} to be a numeric array; got dtype {arr.dtype}")
    return arr


def _dumps(payload: dict[str, Any]) -> bytes:
    arrays = [v for v in payload.values() if isinstance(v, np.ndarray)]
    if all(np.isfinite(a).all() for a in arrays):
        return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    # orjson writes NaN as null; the standard encoder keeps NaN/Infinity so the server can name them
    return json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v
                       for k, v in payload.items()}).encode()


def _json_body(payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = {k: v for k, v in payload.items() if v is not None}
    return _dumps(body), {"content-type": JSON}


def _tensors(response: httpx.Response) -> dict[str, np.ndarray]:
    try:
        return st_load(response.content)
    except (SafetensorError, ValueError) as e:
        raise NFServeError(response.status_code, f"Unreadable safetensors answer: {e}") from None


def _log_prob_call(model: str, x: Any, context: Any, version: int | None,
                   binary: bool | None, threshold: int, values: Any = None) -> _Call:
    if values is not None:  # named constrained values (a model-language target): JSON only
        if x is not None or binary:
            raise TypeError("Give x or values, not both; values travel as JSON")
        named = {k: np.asarray(v).tolist() for k, v in dict(values).items()}
        content, headers = _json_body({"model": model, "version": version, "values": named})
        return _Call("POST", LOG_PROB, _log_prob_json, content=content, headers=headers)
    if x is None:
        raise TypeError("Give the points x (or, for a model-language target, values)")
    x = _rows(x, "x")
    ctx = None if context is None else _rows(context, "context")
    if binary is None:
        binary = x.ndim == 2 and x.shape[0] > threshold
    if binary:
        tensors = {"x": np.ascontiguousarray(x)}
        if ctx is not None:
            tensors["context"] = np.ascontiguousarray(ctx)
        params = {"model": model, **({"version": version} if version is not None else {})}

        def parse(r: httpx.Response) -> np.ndarray:
            return _tensors(r)["log_prob"]

        return _Call("POST", LOG_PROB, parse, params=params, content=st_save(tensors),
                     headers={"content-type": OCTET_STREAM, "accept": OCTET_STREAM})
    content, headers = _json_body({"model": model, "version": version, "x": x, "context": ctx})
    return _Call("POST", LOG_PROB, _log_prob_json, content=content, headers=headers)


def _log_prob_json(r: httpx.Response) -> np.ndarray:
    return np.asarray(orjson.loads(r.content)["log_prob"], dtype=np.float64)


def _draws(r: httpx.Response) -> Draws:
    """A /sample answer, JSON or safetensors (whose metadata holds the columns)."""
    if r.headers.get("content-type", "").startswith(OCTET_STREAM):
        t = _tensors(r)
        meta = _metadata(r)
        columns = json.loads(meta["columns"]) if "columns" in meta else None
        diagnostics = json.loads(meta["diagnostics"]) if "diagnostics" in meta else None
        return Draws(t["samples"], t["log_prob"], columns, t.get("target_log_prob"), diagnostics)
    data = orjson.loads(r.content)
    tlp = data.get("target_log_prob")
    return Draws(np.asarray(data["samples"], dtype=np.float64),
                 np.asarray(data["log_prob"], dtype=np.float64), data.get("columns"),
                 None if tlp is None else np.asarray(tlp, dtype=np.float64),
                 data.get("diagnostics"))


def _metadata(r: httpx.Response) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors answer: its header is 8 bytes of length, then JSON."""
    try:
        size = int.from_bytes(r.content[:8], "little")
        return json.loads(r.content[8:8 + size]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        raise NFServeError(r.status_code, "Unreadable safetensors answer header") from None


def _sample_call(model: str, n: int, seed: int | None, context: Any, version: int | None,
                 binary: bool | None, threshold: int, diagnose: bool = False) -> _Call:
    ctx = None if context is None else _rows(context, "context")
    if binary is None:
        binary = n > threshold
    extra = {"diagnose": True} if diagnose else {}
    if binary:
        params = {k: v for k, v in {"model": model, "version": version, "n": n,
                                    "seed": seed}.items() if v is not None}
        params.update({k: "true" for k in extra})
        content = st_save({"context": np.ascontiguousarray(ctx)}) if ctx is not None else b""

        return _Call("POST", SAMPLE, _draws, params=params, content=content,
                     headers={"content-type": OCTET_STREAM, "accept": OCTET_STREAM})
    content, headers = _json_body({"model": model, "version": version, "n": n, "seed": seed,
                                   "context": ctx, **extra})
    return _Call("POST", SAMPLE, _draws, content=content, headers=headers)


def _pair(d: Draws) -> tuple[np.ndarray, np.ndarray]:
    return d.samples, d.log_prob


def _json(r: httpx.Response) -> Any:
    return r.json()


def _upload_call(name: str, data: bytes | str | os.PathLike, version: int | None) -> _Call:
    if not isinstance(data, bytes | bytearray):
        data = Path(data).read_bytes()
    params = {"name": name, **({"version": version} if version is not None else {})}
    return _Call("POST", "/models", _json, params=params, content=bytes(data),
                 headers={"content-type": OCTET_STREAM})


def _dataset_call(data: Any, filename: str | None, format: str | None) -> _Call:
    if isinstance(data, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, data, allow_pickle=False)
        data, format = buf.getvalue(), format or "npy"
    elif not isinstance(data, bytes | bytearray):
        filename = filename or Path(data).name
        data = Path(data).read_bytes()
    params = {k: v for k, v in {"filename": filename, "format": format}.items() if v is not None}
    return _Call("POST", "/datasets", _json, params=params, content=bytes(data),
                 headers={"content-type": OCTET_STREAM})


def _train_call(name: str, flow: dict[str, Any], objective: dict[str, Any],
                training: dict[str, Any] | None) -> _Call:
    body = {"name": name, "flow": flow, "objective": objective, "training": training or {}}
    return _Call("POST", "/train", _json, content=_dumps(body),
                 headers={"content-type": JSON})


def _content(r: httpx.Response) -> bytes:
    return r.content


def _plot_call(name: str, version: int | None, params: dict[str, Any]) -> _Call:
    query = {k: v for k, v in {"version": version, **params}.items() if v is not None}
    return _Call("GET", f"/models/{name}/plot.png", _content, params=query)


def _jobs_call(status: str | None, name: str | None, limit: int) -> _Call:
    params = {k: v for k, v in {"status": status, "name": name, "limit": limit}.items()
              if v is not None}
    return _Call("GET", "/jobs", lambda r: r.json()["data"], params=params)


class _Wait:
    """When to stop polling a job: once it is final, or (``TimeoutError``) past ``timeout``."""

    def __init__(self, job_id: str, timeout: float):
        self.job_id, self.timeout = job_id, timeout
        self.deadline = time.monotonic() + timeout

    def over(self, job: dict[str, Any]) -> bool:
        if job["status"] in JobStatus.final():
            return True
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"Job {self.job_id} still {job['status']} after {self.timeout} s")
        return False


class _Base:
    def __init__(self, base_url: str, api_key: str | None, binary_rows: int):
        self.base_url = base_url.rstrip("/")
        self.binary_rows = binary_rows
        self._auth = {"authorization": f"Bearer {api_key}"} if api_key else {}

    def _kwargs(self, call: _Call) -> dict[str, Any]:
        return {"params": call.params, "content": call.content,
                "headers": {**self._auth, **call.headers}}


class Client(_Base):
    """Synchronous client.

    Arguments:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer <key>`` when given.
        timeout: seconds per request.
        binary_rows: above this many rows (or samples), use safetensors instead of JSON.
        http: an existing ``httpx.Client`` to send through (e.g. a ``TestClient``); its own
            base URL is used.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 120.0, binary_rows: int = 1000,
                 http: httpx.Client | None = None):
        super().__init__(base_url, api_key, binary_rows)
        self._owned = http is None
        self.http = http or httpx.Client(base_url=self.base_url, timeout=timeout)

    def _do(self, call: _Call) -> Any:
        response = self.http.request(call.method, call.url, **self._kwargs(call))
        return call.parse(_check(response))

    def _get(self, url: str, parse: Callable[[httpx.Response], Any] = _json,
             params: dict[str, Any] | None = None) -> Any:
        return self._do(_Call("GET", url, parse, params=params))

    # inference
    def log_prob(self, model: str, x: Any = None, *, values: Any = None, context: Any = None,
                 version: int | None = None, binary: bool | None = None) -> np.ndarray:
        """log p(x) for each row of ``x`` (shape (N, dim)) under ``model``. For a model fit to a
        model-language target: ``values`` (parameter name -> array (N, *shape)) or rows ``x`` in
        its constrained space, and the answer is log q there."""
        return self._do(_log_prob_call(model, x, context, version, binary, self.binary_rows,
                                       values))

    def sample(self, model: str, n: int, *, seed: int | None = None, context: Any = None,
               version: int | None = None, binary: bool | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """``(samples, log_prob)``: ``n`` samples of ``model``; a seed makes them reproducible."""
        return _pair(self.draws(model, n, seed=seed, context=context, version=version,
                                binary=binary))

    def draws(self, model: str, n: int, *, seed: int | None = None, context: Any = None,
              version: int | None = None, binary: bool | None = None,
              diagnose: bool = False) -> Draws:
        """``n`` samples with everything the answer holds (``Draws``): for a model fit to a
        model-language target, the named constrained columns, log q there and the model's log
        density (``Draws.log_weights``, ``Draws.named()``), and with ``diagnose`` these draws'
        diagnostics (``Draws.diagnostics``: whether to trust this answer)."""
        return self._do(_sample_call(model, n, seed, context, version, binary, self.binary_rows,
                                     diagnose))

    # models
    def models(self) -> list[dict[str, Any]]:
        """Every model: name, versions, latest, dim, context_dim."""
        return self._get("/models")["data"]

    def model(self, name: str) -> dict[str, Any]:
        """One model with all its versions' metadata."""
        return self._get(f"/models/{name}")

    def download_model(self, name: str, version: int) -> bytes:
        """The bytes of a version's model.safetensors."""
        return self._get(f"/models/{name}/versions/{version}/artifact", _content)

    def upload_model(self, name: str, data: bytes | str | os.PathLike, *,
                     version: int | None = None) -> dict[str, Any]:
        """Upload a model.safetensors (bytes or path) as the next version (or ``version``)."""
        return self._do(_upload_call(name, data, version))

    def plot(self, name: str, *, version: int | None = None, **params: Any) -> bytes:
        """PNG of a 2-D model's density and samples (``n``, ``grid``, ``seed`` as query)."""
        return self._do(_plot_call(name, version, params))

    # training data and jobs
    def upload_dataset(self, data: Any, *, filename: str | None = None,
                       format: str | None = None) -> dict[str, Any]:
        """Upload training data: a numpy array, or the bytes or path of a CSV, .npy or safetensors
        file. Returns id, rows and dim."""
        return self._do(_dataset_call(data, filename, format))

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._get(f"/datasets/{dataset_id}")

    def train(self, name: str, flow: dict[str, Any], objective: dict[str, Any],
              training: dict[str, Any] | None = None) -> dict[str, Any]:
        """Queue a training job; returns ``{job_id, status, status_url}``."""
        return self._do(_train_call(name, flow, objective, training))

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's status, progress, result and error."""
        return self._get(f"/jobs/{job_id}")

    def jobs(self, *, status: str | None = None, name: str | None = None,
             limit: int = 100) -> list[dict[str, Any]]:
        """Jobs, newest first, optionally of one status or model name."""
        return self._do(_jobs_call(status, name, limit))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job (409 if it already finished)."""
        return self._do(_Call("DELETE", f"/jobs/{job_id}", _json))

    def wait_job(self, job_id: str, *, timeout: float = 600.0, poll: float = 0.5
                 ) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or cancelled; ``TimeoutError`` past ``timeout``."""
        wait = _Wait(job_id, timeout)
        while not wait.over(job := self.job(job_id)):
            time.sleep(poll)
        return job

    # health
    def live(self) -> dict[str, Any]:
        return self._get("/health/live")

    def ready(self) -> dict[str, Any]:
        return self._get("/health/ready")

    def metrics(self) -> str:
        return self._get("/metrics", lambda r: r.text)

    def close(self) -> None:
        if self._owned:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """Asynchronous client; every method of ``Client``, awaited.

    One ``AsyncClient`` shares one httpx connection pool. At high concurrency the pool itself costs
    CPU: on the 2-core benchmark machine, 64 concurrent requests through one pool ran at ~75
    requests/s against ~470 for the same server with raw sockets (benchmarks/serving.py uses a
    minimal load generator for that reason). Send large batches, or cap ``max_connections``.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 120.0, binary_rows: int = 1000,
                 http: httpx.AsyncClient | None = None, max_connections: int = 100):
        super().__init__(base_url, api_key, binary_rows)
        self._owned = http is None
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections)
        self.http = http or httpx.AsyncClient(base_url=self.base_url, timeout=timeout,
                                              limits=limits)

    async def _do(self, call: _Call) -> Any:
        response = await self.http.request(call.method, call.url, **self._kwargs(call))
        return call.parse(_check(response))

    async def _get(self, url: str, parse: Callable[[httpx.Response], Any] = _json,
                   params: dict[str, Any] | None = None) -> Any:
        return await self._do(_Call("GET", url, parse, params=params))

    async def log_prob(self, model: str, x: Any = None, *, values: Any = None,
                       context: Any = None, version: int | None = None,
                       binary: bool | None = None) -> np.ndarray:
        return await self._do(_log_prob_call(model, x, context, version, binary,
                                             self.binary_rows, values))

    async def sample(self, model: str, n: int, *, seed: int | None = None, context: Any = None,
                     version: int | None = None, binary: bool | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        return _pair(await self.draws(model, n, seed=seed, context=context, version=version,
                                      binary=binary))

    async def draws(self, model: str, n: int, *, seed: int | None = None, context: Any = None,
                    version: int | None = None, binary: bool | None = None,
                    diagnose: bool = False) -> Draws:
        return await self._do(_sample_call(model, n, seed, context, version, binary,
                                           self.binary_rows, diagnose))

    async def models(self) -> list[dict[str, Any]]:
        return (await self._get("/models"))["data"]

    async def model(self, name: str) -> dict[str, Any]:
        return await self._get(f"/models/{name}")

    async def download_model(self, name: str, version: int) -> bytes:
        return await self._get(f"/models/{name}/versions/{version}/artifact", _content)

    async def plot(self, name: str, *, version: int | None = None, **params: Any) -> bytes:
        return await self._do(_plot_call(name, version, params))

    async def upload_model(self, name: str, data: bytes | str | os.PathLike, *,
                           version: int | None = None) -> dict[str, Any]:
        return await self._do(_upload_call(name, data, version))

    async def upload_dataset(self, data: Any, *, filename: str | None = None,
                             format: str | None = None) -> dict[str, Any]:
        return await self._do(_dataset_call(data, filename, format))

    async def dataset(self, dataset_id: str) -> dict[str, Any]:
        return await self._get(f"/datasets/{dataset_id}")

    async def train(self, name: str, flow: dict[str, Any], objective: dict[str, Any],
                    training: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._do(_train_call(name, flow, objective, training))

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self._get(f"/jobs/{job_id}")

    async def jobs(self, *, status: str | None = None, name: str | None = None,
                   limit: int = 100) -> list[dict[str, Any]]:
        return await self._do(_jobs_call(status, name, limit))

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        return await self._do(_Call("DELETE", f"/jobs/{job_id}", _json))

    async def wait_job(self, job_id: str, *, timeout: float = 600.0, poll: float = 0.5
                       ) -> dict[str, Any]:
        wait = _Wait(job_id, timeout)
        while not wait.over(job := await self.job(job_id)):
            await asyncio.sleep(poll)
        return job

    async def live(self) -> dict[str, Any]:
        return await self._get("/health/live")

    async def ready(self) -> dict[str, Any]:
        return await self._get("/health/ready")

    async def metrics(self) -> str:
        return await self._get("/metrics", lambda r: r.text)

    async def aclose(self) -> None:
        if self._owned:
            await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
