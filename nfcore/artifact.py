"""Model artifacts: one ``model.safetensors`` per model version, no pickled objects.

Tensors are the flow's ``state_dict``. ``__metadata__`` holds the normalized spec, the format version,
what scoring and sampling cost and whether scoring is exact (``nfcore.cost``,
``nfcore.log_prob_exact``), the caller's metadata (e.g. the training summary) and a SHA-256
content hash over all of it. Loading
parses the header itself before trusting it, rebuilds the flow from the spec, checks every tensor's
name, dtype and shape, verifies the hash and only then loads the weights strictly.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import ArtifactError, SpecError
from .flow import Flow

__all__ = ["save", "saves", "load", "loads", "read_metadata", "read_info", "ArtifactInfo",
           "atomic_write", "FORMAT_VERSION"]

FORMAT_VERSION = "1"
SPEC_KEY = "nfcore.spec"
FORMAT_KEY = "nfcore.format_version"
HASH_KEY = "nfcore.content_hash"
#: What ``log_prob`` and sampling cost (``Flow.cost``), and whether ``log_prob`` is exact
#: (``Flow.exact_log_prob``), as JSON. Written by ``save``; files written before lack them.
COST_KEY = "nfcore.cost"
EXACT_KEY = "nfcore.log_prob_exact"
MAX_HEADER = 16 * 2**20


def _content_hash(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != HASH_KEY:
            h.update(json.dumps([key, metadata[key]]).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def saves(flow: Flow, *, metadata: Mapping[str, Any] | None = None) -> bytes:
    """Serialize ``flow`` to safetensors bytes (see ``save``)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in flow.state_dict().items()}
    meta: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if key.startswith("nfcore."):
            raise ValueError(f"Expected metadata keys outside the 'nfcore.' namespace; got {key!r}")
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    meta[SPEC_KEY] = json.dumps(flow.spec, sort_keys=True)
    meta[COST_KEY] = json.dumps(flow.cost, sort_keys=True)
    meta[EXACT_KEY] = json.dumps(flow.exact_log_prob)
    meta[FORMAT_KEY] = FORMAT_VERSION
    meta[HASH_KEY] = _content_hash(tensors, meta)
    return st_save(tensors, metadata=meta)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a part:
    a temporary file in the same folder, fsync, rename over ``path``, fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(flow: Flow, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> str:
    """Write ``flow`` to ``path`` atomically (temporary file, fsync, rename). Returns the hash."""
    data = saves(flow, metadata=metadata)
    atomic_write(path, data)
    return _header(data)[1][HASH_KEY]


def _header(data: bytes) -> tuple[dict, dict[str, str]]:
    if len(data) < 8:
        raise ArtifactError(f"Truncated model file: {len(data)} bytes, not even a header length")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER or 8 + n > len(data):
        raise ArtifactError(f"Truncated or corrupted model file: header of {n} bytes in a file of "
                            f"{len(data)} bytes")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"Corrupted model file: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactError("Corrupted model file: header is not a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ArtifactError("Not an nfcore model: no string-to-string __metadata__")
    for key in (SPEC_KEY, FORMAT_KEY, HASH_KEY):
        if key not in meta:
            raise ArtifactError(f"Not an nfcore model: __metadata__ lacks {key!r}")
    if meta[FORMAT_KEY] != FORMAT_VERSION:
        raise ArtifactError(f"Unsupported nfcore format version {meta[FORMAT_KEY]!r}; this nfcore "
                            f"reads version {FORMAT_VERSION!r}")
    return header, meta


def _head(source: str | os.PathLike | bytes) -> bytes:
    """The bytes of a model file up to the end of its header (a path is read no further)."""
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    try:
        with open(source, "rb") as f:
            start = f.read(8)
            n = int.from_bytes(start, "little") if len(start) == 8 else 0
            return start + f.read(min(n, MAX_HEADER))
    except OSError as e:
        raise ArtifactError(f"Cannot read model file {str(source)!r}: {e.strerror}") from None


def read_metadata(source: str | os.PathLike | bytes) -> dict[str, str]:
    """The raw ``__metadata__`` of a model file (validated header, no weights loaded)."""
    return dict(_header(_head(source))[1])


@dataclass(frozen=True)
class ArtifactInfo:
    """What a model file says about itself, from its header alone.

    Arguments:
        spec: the normalized spec the flow is rebuilt from.
        content_hash: ``sha256:…`` over the weights and the metadata.
        format_version: the nfcore artifact format.
        metadata: the caller's metadata given to ``save``, JSON values decoded (e.g. ``training``).
        cost: what ``log_prob`` and sampling cost (``Flow.cost``); log_prob_exact: whether scoring
            is exact (``Flow.exact_log_prob``). Files written before these were stored get them
            from their spec.
    """

    spec: dict[str, Any]
    content_hash: str
    format_version: str
    metadata: dict[str, Any]
    cost: dict[str, str]
    log_prob_exact: bool


def _decoded(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def read_info(source: str | os.PathLike | bytes) -> ArtifactInfo:
    """The spec, content hash and metadata of a model file, reading only its header.

    Raises ``ArtifactError`` for a file that is not an nfcore model.

    Example:
        >>> import nfcore
        >>> flow = nfcore.build({"preset": "maf", "dim": 2, "transforms": 1, "hidden": [4]})
        >>> info = read_info(nfcore.saves(flow, metadata={"training": {"steps": 3}}))
        >>> info.spec["dim"], info.metadata, info.content_hash.startswith("sha256:")
        (2, {'training': {'steps': 3}}, True)
    """
    _, meta = _header(_head(source))
    try:
        spec = json.loads(meta[SPEC_KEY])
    except json.JSONDecodeError as e:
        raise ArtifactError(f"Model file holds an invalid spec: {e}") from None
    if not isinstance(spec, dict):
        raise ArtifactError("Model file holds an invalid spec: not a JSON object")
    if COST_KEY in meta and EXACT_KEY in meta:
        cost, exact = _decoded(meta[COST_KEY]), _decoded(meta[EXACT_KEY])
    else:  # written before they were stored: the spec says (built under a forked RNG)
        try:
            with torch.random.fork_rng(devices=[]):
                flow = Flow(spec)
        except SpecError as e:
            raise ArtifactError(f"Model file holds an invalid spec: {e}") from None
        cost, exact = flow.cost, flow.exact_log_prob
    return ArtifactInfo(spec=spec, content_hash=meta[HASH_KEY], format_version=meta[FORMAT_KEY],
                        metadata={k: _decoded(v) for k, v in meta.items()
                                  if not k.startswith("nfcore.")},
                        cost=cost, log_prob_exact=bool(exact))


def loads(data: bytes, *, device: str | torch.device | None = None) -> Flow:
    """Rebuild a flow from safetensors bytes; raises ``ArtifactError`` on any defect."""
    data = bytes(data)
    _, meta = _header(data)
    try:
        spec = json.loads(meta[SPEC_KEY])
        flow = Flow(spec)
    except (json.JSONDecodeError, SpecError) as e:
        raise ArtifactError(f"Model file holds an invalid spec: {e}") from None
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"Corrupted model file: {e}") from None
    if _content_hash(tensors, meta) != meta[HASH_KEY]:
        raise ArtifactError("Model file fails its content hash: it was modified or corrupted")
    expected = flow.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ArtifactError(f"Model file does not match its spec: missing tensors {missing}, "
                            f"unexpected tensors {extra}")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ArtifactError(f"Tensor {name!r} has shape {tuple(got.shape)} and dtype "
                                f"{got.dtype}; the spec needs {tuple(want.shape)} and {want.dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise ArtifactError(f"Tensor {name!r} holds NaN or infinite values")
    flow.load_state_dict(tensors, strict=True)
    flow.metadata = {k: v for k, v in meta.items() if not k.startswith("nfcore.")}
    flow.train(False)
    return flow.to(device) if device is not None else flow


def load(path: str | os.PathLike, *, device: str | torch.device | None = None) -> Flow:
    """Load a flow saved by ``save``; raises ``ArtifactError`` for a bad file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"Cannot read model file {str(path)!r}: {e.strerror}") from None
    return loads(data, device=device)
