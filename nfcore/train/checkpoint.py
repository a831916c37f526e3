"""Training checkpoints as safetensors: weights, optimizer state, extra tensors and JSON loop state.

A checkpoint is written to a temporary file and renamed, so a killed process leaves either the old
checkpoint or the new one. Nothing is pickled: tensors go in the body, everything else is JSON in
``__metadata__``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from ..artifact import atomic_write
from ..errors import ArtifactError

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_step", "clone_state",
           "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "nfcore-checkpoint-1"
_KEY = "nfcore.checkpoint"


def _split_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: dict[str, Tensor],
    optimizer: dict,
    tensors: dict[str, Tensor] | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    """Atomically write ``model`` (a state_dict), ``optimizer`` (its state_dict), extra ``tensors``
    and a JSON-serializable ``state`` to ``path``."""
    body: dict[str, Tensor] = {}
    for prefix, group in (("model", model), ("extra", tensors or {})):
        for name, t in group.items():
            body[f"{prefix}.{name}"] = t.detach().to("cpu").contiguous().clone()
    optim_tensors, optim_meta = _split_optimizer(optimizer)
    for name, t in optim_tensors.items():
        body[name] = t.detach().to("cpu").contiguous().clone()
    meta = {"format": CHECKPOINT_FORMAT, "state": state or {}, "optimizer": optim_meta}
    atomic_write(path, st_save(body, metadata={_KEY: json.dumps(meta)}))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint: ``{"model", "optimizer", "tensors", "state"}``; ``ArtifactError`` if bad."""
    try:
        data = Path(path).read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header["__metadata__"][_KEY])
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown format {meta.get('format')!r}")
        body = st_load(data)
    except (OSError, KeyError, TypeError, ValueError, SafetensorError) as e:
        raise ArtifactError(f"Cannot resume from checkpoint {str(path)!r}: {e}") from None
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "extra": {}, "optimizer": {}}
    for key, t in body.items():
        prefix, _, name = key.partition(".")
        if prefix == "optimizer":
            groups["optimizer"][key] = t
        else:
            groups[prefix][name] = t
    return {"model": groups["model"], "tensors": groups["extra"], "state": meta["state"],
            "optimizer": _join_optimizer(groups["optimizer"], meta["optimizer"])}


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step a checkpoint holds, from its header alone; None when there is no readable one.

    A job runner reads it to report where a resumed run starts, without loading any tensor.

    Example:
        >>> import tempfile, torch
        >>> path = Path(tempfile.mkdtemp()) / "ckpt.safetensors"
        >>> checkpoint_step(path) is None
        True
        >>> net = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(net.parameters())
        >>> save_checkpoint(path, model=net.state_dict(), optimizer=opt.state_dict(),
        ...                 state={"step": 12})
        >>> checkpoint_step(path)
        12
    """
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(n, 64 * 2**20)))
        meta = json.loads(header["__metadata__"][_KEY])
        if meta.get("format") != CHECKPOINT_FORMAT:
            return None
        return int(meta["state"]["step"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def clone_state(module: torch.nn.Module) -> dict[str, Tensor]:
    """A detached copy of a module's state_dict (e.g. the best weights so far)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
