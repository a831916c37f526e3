"""Training data: parse uploads (CSV, ``.npy``, safetensors) and keep them as safetensors files.

Every check happens here, once, before anything is stored: a malformed file, a non-numeric cell,
a ragged row, a wrong dtype or a NaN/inf value is refused with a message that counts the problems
and names where the first ones are. ``.npy`` files are read with ``allow_pickle=False`` (an object
array is refused, never unpickled) and safetensors files hold no code by construction.

Stored form: ``data_dir/datasets/<id>.safetensors`` with a tensor ``x`` of shape ``(rows, dim)``
and, for conditional flows, ``context`` of shape ``(rows, context_dim)``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import nfcore
from nfcore.spec import LIMITS

from ..errors import InvalidInput
from .records import Database, DatasetRecord, new_id

__all__ = ["ParsedData", "parse_upload", "parse_csv", "parse_npy", "parse_safetensors",
           "parse_inline", "save_dataset", "load_dataset", "FORMATS"]

FORMATS = ("csv", "npy", "safetensors")
_SHOW = 5  # positions named in an error message


@dataclass
class ParsedData:
    """A validated data set: finite real ``x`` of shape (rows, dim), optional ``context``."""

    x: np.ndarray
    context: np.ndarray | None
    format: str

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @property
    def context_dim(self) -> int:
        return 0 if self.context is None else int(self.context.shape[1])


def _listing(items: list[str], total: int) -> str:
    shown = "; ".join(items[:_SHOW])
    more = f"; and {total - _SHOW} more" if total > _SHOW else ""
    return shown + more


def _plural(n: int, word: str, verb: str = "") -> str:
    """``_plural(2, "row", "hold")`` is "2 rows hold"; with 1, "1 row holds"."""
    out = f"{n} {word}{'' if n == 1 else 's'}"
    if verb:
        singular = {"are": "is", "do not": "does not", "hold": "holds"}.get(verb, verb)
        out += " " + (singular if n == 1 else verb)
    return out


# ---------------------------------------------------------------------- array checks
def _check_array(a: np.ndarray, what: str) -> np.ndarray:
    """Real numbers, 2-D (1-D is one column), finite, at least one row; float32 or float64."""
    kind = a.dtype.kind
    if kind == "b":
        raise InvalidInput(f"{what}: expected real numbers; got booleans (dtype {a.dtype})")
    if kind not in "fiu":
        raise InvalidInput(f"{what}: expected real numbers (float or integer dtype); "
                           f"got dtype {a.dtype}")
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise InvalidInput(f"{what}: expected a 2-D array (rows, dim); got shape {a.shape}")
    if a.shape[0] == 0:
        raise InvalidInput(f"{what}: no data rows")
    if not 1 <= a.shape[1] <= LIMITS["dim"]:
        raise InvalidInput(f"{what}: expected 1 to {LIMITS['dim']} columns; got {a.shape[1]}")
    a = a.astype(np.float32 if kind == "f" and a.dtype.itemsize <= 4 else np.float64, copy=False)
    finite = np.isfinite(a)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        cells = int((~finite).sum())
        items = []
        for r in bad_rows[:_SHOW]:
            cols = np.flatnonzero(~finite[r])
            vals = ", ".join(f"column index {c} is {a[r, c]}" for c in cols[:3])
            items.append(f"row index {r}: {vals}")
        raise InvalidInput(f"{what}: {_plural(len(bad_rows), 'row')} ({_plural(cells, 'value')}) "
                           f"{'holds' if len(bad_rows) == 1 else 'hold'} NaN or inf: "
                           f"{_listing(items, len(bad_rows))}")
    return np.ascontiguousarray(a)


# ---------------------------------------------------------------------- formats
def parse_csv(data: bytes) -> ParsedData:
    """Comma-, semicolon-, tab- or space-separated numbers; an optional header row of names."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"CSV: not UTF-8 text (invalid byte at offset {e.start})") from None
    lines = text.splitlines()
    sample = "\n".join(lines[:20])
    delimiter = ","
    if sample.strip():
        try:
            delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t ").delimiter
        except csv.Error:
            delimiter = "," if "," in sample else ("\t" if "\t" in sample else " ")
    rows: list[list[float]] = []
    lines_of_rows: list[int] = []
    bad_cells: list[str] = []
    n_bad_cells = 0
    ragged: list[str] = []
    n_ragged = 0
    width: int | None = None
    header_seen = False
    reader = csv.reader(lines, delimiter=delimiter, skipinitialspace=True)
    for lineno, raw in enumerate(reader, start=1):
        cells = [c.strip() for c in raw]
        if delimiter == " ":
            cells = [c for c in cells if c]
        if not cells or all(c == "" for c in cells):
            continue
        values: list[float] = []
        bad_here: list[tuple[int, str]] = []
        for col, cell in enumerate(cells):
            try:
                values.append(float(cell))
            except ValueError:
                bad_here.append((col, cell))
        if width is None and not header_seen and len(bad_here) == len(cells):
            header_seen = True  # every cell is a name: a header row
            width = len(cells)
            continue
        if width is None:
            width = len(cells)
        if len(cells) != width:
            n_ragged += 1
            if len(ragged) < _SHOW:
                ragged.append(f"line {lineno} has {len(cells)} columns")
            continue
        if bad_here:
            n_bad_cells += len(bad_here)
            for col, cell in bad_here:
                if len(bad_cells) < _SHOW:
                    shown = repr(cell[:20] + ("…" if len(cell) > 20 else ""))
                    bad_cells.append(f"line {lineno} column {col + 1}: {shown}")
            continue
        rows.append(values)
        lines_of_rows.append(lineno)
    problems = []
    if n_bad_cells:
        problems.append(f"{_plural(n_bad_cells, 'cell', 'are')} not numbers "
                        f"({_listing(bad_cells, n_bad_cells)})")
    if n_ragged:
        problems.append(f"{_plural(n_ragged, 'row', 'do not')} have the {width} columns of the "
                        f"first row ({_listing(ragged, n_ragged)})")
    if problems:
        raise InvalidInput("CSV: " + "; ".join(problems))
    if not rows:
        raise InvalidInput("CSV: no data rows")
    x = np.asarray(rows, dtype=np.float64)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        items = [f"line {lines_of_rows[i]}" for i in bad[:_SHOW]]
        raise InvalidInput(f"CSV: {_plural(len(bad), 'row', 'hold')} NaN or inf: "
                           f"{_listing(items, len(bad))}")
    return ParsedData(_check_array(x, "CSV"), None, "csv")


def parse_npy(data: bytes) -> ParsedData:
    """A NumPy ``.npy`` file of real numbers; object arrays are refused, never unpickled."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise InvalidInput(f".npy: unsupported format version {version}; use 1.0 or 2.0")
    except ValueError as e:
        raise InvalidInput(f".npy: not a valid .npy file ({e})") from None
    if dtype.hasobject or dtype.kind not in "fiub" or dtype.fields is not None:
        raise InvalidInput(f".npy: expected real numbers (float or integer dtype); got dtype "
                           f"{dtype}")
    need = math.prod(shape) * dtype.itemsize
    have = len(data) - f.tell()
    if have < need:
        raise InvalidInput(f".npy: truncated file: the header promises {need} bytes of data for "
                           f"shape {shape}; the file holds {have}")
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise InvalidInput(f".npy: cannot read the array ({e})") from None
    return ParsedData(_check_array(a, ".npy"), None, "npy")


def parse_safetensors(data: bytes) -> ParsedData:
    """A safetensors file with tensor ``x`` (or ``data``, or a single tensor) and an optional
    ``context`` with as many rows."""
    try:
        tensors = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise InvalidInput(f"safetensors: not a valid safetensors file ({e})") from None
    names = sorted(tensors)
    if "x" in tensors:
        key = "x"
    elif "data" in tensors:
        key = "data"
    elif len(names) == 1:
        key = names[0]
    else:
        raise InvalidInput(f"safetensors: expected a tensor named 'x' (and optionally 'context'); "
                           f"got tensors {names}")
    extra = set(names) - {key, "context"}
    if extra and key in ("x", "data"):
        raise InvalidInput(f"safetensors: unexpected tensors {sorted(extra)}; expected 'x' and "
                           f"optionally 'context'")

    def numpy(t: torch.Tensor, name: str) -> np.ndarray:
        if t.dtype == torch.bool:
            raise InvalidInput(f"safetensors tensor {name!r}: expected real numbers; got bool")
        if t.is_complex():
            raise InvalidInput(f"safetensors tensor {name!r}: expected real numbers; got {t.dtype}")
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        return t.numpy()

    x = _check_array(numpy(tensors[key], key), f"safetensors tensor {key!r}")
    context = None
    if "context" in tensors and key != "context":
        context = _check_array(numpy(tensors["context"], "context"), "safetensors tensor 'context'")
        if context.shape[0] != x.shape[0]:
            raise InvalidInput(f"safetensors: 'context' has {context.shape[0]} rows; 'x' has "
                               f"{x.shape[0]}")
    return ParsedData(x, context, "safetensors")


def parse_inline(x: Any, context: Any = None, *, what: str = "objective.data") -> ParsedData:
    """Rows given inline in a JSON request: a list of equally long lists of numbers."""

    def array(value: Any, name: str) -> np.ndarray:
        if not isinstance(value, list) or not value:
            raise InvalidInput(f"{name}: expected a non-empty list of rows")
        rows = [r if isinstance(r, list) else [r] for r in value]
        width = len(rows[0])
        ragged = [i for i, r in enumerate(rows) if len(r) != width]
        if ragged:
            raise InvalidInput(f"{name}: {_plural(len(ragged), 'row', 'do not')} have the {width} "
                               f"values of row 0 (row indices {ragged[:_SHOW]})")
        bad = [(i, j) for i, r in enumerate(rows) for j, v in enumerate(r)
               if isinstance(v, bool) or not isinstance(v, int | float)]
        if bad:
            where = "; ".join(f"[{i}][{j}]: {rows[i][j]!r}" for i, j in bad[:_SHOW])
            raise InvalidInput(f"{name}: {_plural(len(bad), 'value', 'are')} not numbers ({where})")
        try:
            return np.asarray(rows, dtype=np.float64)
        except OverflowError:
            raise InvalidInput(f"{name}: a value is too large for float64") from None

    xs = _check_array(array(x, what), what)
    cs = None
    if context is not None:
        cs = _check_array(array(context, f"{what}_context"), f"{what}_context")
        if cs.shape[0] != xs.shape[0]:
            raise InvalidInput(f"{what}_context has {cs.shape[0]} rows; the data has "
                               f"{xs.shape[0]}")
    return ParsedData(xs, cs, "inline")


def _sniff(data: bytes, filename: str | None, content_type: str | None) -> str:
    name = (filename or "").lower()
    for ext, fmt in ((".npy", "npy"), (".safetensors", "safetensors"), (".csv", "csv"),
                     (".tsv", "csv"), (".txt", "csv")):
        if name.endswith(ext):
            return fmt
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in ("text/csv", "text/plain", "text/tab-separated-values"):
        return "csv"
    if data[:6] == b"\x93NUMPY":
        return "npy"
    if len(data) >= 10 and data[8:9] == b"{":
        n = int.from_bytes(data[:8], "little")
        if 0 < n <= len(data) - 8:
            return "safetensors"
    return "csv"


def parse_upload(data: bytes, *, filename: str | None = None, content_type: str | None = None,
                 format: str | None = None) -> ParsedData:
    """Parse an uploaded file; the format is ``format``, else the file name's extension, else the
    content type, else sniffed from the first bytes."""
    if not data:
        raise InvalidInput("Empty upload: expected a CSV, .npy or safetensors file")
    fmt = format or _sniff(data, filename, content_type)
    if fmt not in FORMATS:
        raise InvalidInput(f"format: expected one of {list(FORMATS)}; got {fmt!r}")
    return {"csv": parse_csv, "npy": parse_npy, "safetensors": parse_safetensors}[fmt](data)


# ---------------------------------------------------------------------- storage

def save_dataset(db: Database, data_dir: str | os.PathLike, parsed: ParsedData, *,
                 filename: str | None = None) -> DatasetRecord:
    """Write the data as ``datasets/<id>.safetensors`` under ``data_dir`` and record it."""
    tensors = {"x": torch.from_numpy(parsed.x)}
    if parsed.context is not None:
        tensors["context"] = torch.from_numpy(parsed.context)
    blob = st_save(tensors, metadata={"format": parsed.format})
    dataset_id = new_id("ds")
    rel = f"datasets/{dataset_id}.safetensors"
    nfcore.atomic_write(Path(data_dir) / rel, blob)
    row = DatasetRecord(id=dataset_id, filename=(filename or None) and filename[:256],
                  format=parsed.format, rows=parsed.rows, dim=parsed.dim,
                  context_dim=parsed.context_dim, dtype=str(parsed.x.dtype), bytes=len(blob),
                  sha256="sha256:" + hashlib.sha256(blob).hexdigest(), path=rel)
    with db.session() as s:
        s.add(row)
    return row


def load_dataset(data_dir: str | os.PathLike, row: DatasetRecord) -> tuple[torch.Tensor,
                                                                     torch.Tensor | None]:
    """The stored ``(x, context)`` of a dataset row."""
    blob = (Path(data_dir) / row.path).read_bytes()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    if digest != row.sha256:
        raise RuntimeError(f"Dataset {row.id} file does not match its recorded hash")
    tensors = st_load(blob)
    return tensors["x"], tensors.get("context")
