"""The model store: ``<root>/<name>/<version>/model.safetensors`` on a (maybe shared) file system.

Versions are positive integers written as directory names (``1``, ``2``, …); the latest is the
highest one that holds a ``model.safetensors``. Nothing is cached about which versions exist, so a
version published by a worker (or copied in by hand) is servable at once, without a restart.

Publishing is safe against concurrent publishers: a version directory is claimed with an exclusive
``mkdir`` and the file inside is written atomically (temporary file, fsync, rename) by ``nfcore``.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nfcore
from nfcore import ArtifactInfo, read_info

from .errors import Conflict, InvalidInput, NotFound

__all__ = ["ModelStore", "ModelVersionInfo", "ModelNotFound", "VersionExists", "InvalidName",
           "ARTIFACT", "NAME_PATTERN"]

ARTIFACT = "model.safetensors"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")


class ModelNotFound(NotFound, LookupError):
    """No such model name, or no such version of it."""


class VersionExists(Conflict, FileExistsError):
    """A publish asked for a version number that is already taken."""


class InvalidName(InvalidInput, ValueError):
    """A model name that is not a safe directory name."""


@dataclass(frozen=True)
class ModelVersionInfo:
    """What the store knows about one version without loading its weights (``metadata`` is the
    caller's metadata given to ``nfcore.save``, JSON values decoded)."""

    name: str
    version: int
    path: Path
    size_bytes: int
    created: datetime
    spec: dict[str, Any]
    content_hash: str
    metadata: dict[str, Any]
    cost: dict[str, str]
    log_prob_exact: bool


class ModelStore:
    """File-system model store rooted at ``root`` (created if missing)."""

    def __init__(self, root: str | os.PathLike, *, refresh_s: float = 0.0):
        self.root = Path(root)
        self.refresh_s = refresh_s
        self._info_cache: dict[tuple[str, int, int], ArtifactInfo] = {}
        # name -> (directory mtime, when checked, complete versions)
        self._versions_cache: dict[str, tuple[int, float, list[int]]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ names and versions
    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidName(
                f"Expected a model name of 1 to 64 letters, digits, '.', '_' or '-' that starts "
                f"with a letter or digit; got {name!r}")
        return name

    def open(self) -> None:
        """Create the root directory if needed (called by the app's lifespan)."""
        self.root.mkdir(parents=True, exist_ok=True)

    def readable(self) -> bool:
        return self.root.is_dir() and os.access(self.root, os.R_OK | os.X_OK)

    def names(self) -> list[str]:
        """Names of the models that have at least one complete version, sorted."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in os.scandir(self.root):
            if entry.is_dir() and _NAME.match(entry.name) and self.versions(entry.name,
                                                                             fresh=True):
                out.append(entry.name)
        return sorted(out)

    def versions(self, name: str, *, fresh: bool = False) -> list[int]:
        """Complete versions of ``name`` (those holding a model file), ascending; [] if none.

        A listing is reused for ``refresh_s`` seconds (no system call at all: on a busy server
        even a ``stat`` waits for the GIL behind the inference thread), then reused further only
        while the model's directory mtime is unchanged: a new version directory changes it. A
        listing that saw a version directory without its file yet (a publish in progress) is
        never reused. ``fresh=True`` skips the time window.
        """
        if not _NAME.match(name):
            return []
        now = time.monotonic()
        cached = self._versions_cache.get(name)
        if cached is not None and not fresh and now - cached[1] < self.refresh_s:
            return list(cached[2])
        folder = os.path.join(self.root, name)
        try:
            stamp = os.stat(folder).st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            self._versions_cache.pop(name, None)
            return []
        if cached is not None and cached[0] == stamp:
            self._versions_cache[name] = (stamp, now, cached[2])
            return list(cached[2])
        try:
            entries = [e for e in os.scandir(folder) if _VERSION.match(e.name)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        complete = sorted(int(e.name) for e in entries
                          if os.path.isfile(os.path.join(e.path, ARTIFACT)))
        if complete and len(complete) == len(entries):
            self._versions_cache[name] = (stamp, now, complete)
        else:
            self._versions_cache.pop(name, None)
        return list(complete)

    def latest(self, name: str) -> int:
        """The highest version (seen within the last ``refresh_s`` seconds)."""
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound(f"Unknown model {name!r}; GET /models lists the models")
        return versions[-1]

    def resolve(self, name: str, version: int | None = None) -> int:
        """The version a request means: ``version`` if it exists, else the latest. An explicit
        version missing from a reused listing is looked up afresh before a 404."""
        if version is None:
            return self.latest(name)
        if version in self.versions(name):
            return version
        known = self.versions(name, fresh=True)
        if version in known:
            return version
        if not known:
            raise ModelNotFound(f"Unknown model {name!r}; GET /models lists the models")
        raise ModelNotFound(f"Model {name!r} has no version {version}; its versions are {known}")

    def path(self, name: str, version: int) -> Path:
        return self.root / name / str(version) / ARTIFACT

    # ------------------------------------------------------------------ metadata
    def info(self, name: str, version: int) -> ModelVersionInfo:
        """Spec, hash and metadata of one version (header only, cached by file identity);
        ``nfcore.ArtifactError`` for a file that is not a model."""
        path = self.path(name, self.resolve(name, version))
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ModelNotFound(f"Model {name!r} has no version {version}") from None
        key = (str(path), st.st_mtime_ns, st.st_size)
        info = self._info_cache.get(key)
        if info is None:
            info = read_info(path)
            with self._lock:
                if len(self._info_cache) > 4096:
                    self._info_cache.clear()
                self._info_cache[key] = info
        return ModelVersionInfo(name=name, version=version, path=path, size_bytes=st.st_size,
                                created=datetime.fromtimestamp(st.st_mtime, UTC), spec=info.spec,
                                content_hash=info.content_hash, metadata=info.metadata,
                                cost=info.cost, log_prob_exact=info.log_prob_exact)

    def health(self) -> tuple[str, bool, str]:
        """The readiness check of the store: readable, and every model's latest version loads."""
        if not self.readable():
            return "model_store", False, f"{self.root} is not a readable directory"
        names = self.names()
        unreadable = []
        for name in names[:100]:
            try:
                self.info(name, self.latest(name))
            except Exception as e:  # any defect of a stored file makes it unloadable
                unreadable.append(f"{name}: {e}")
        if unreadable:
            return "model_store", False, "; ".join(unreadable)
        return "model_store", True, f"{len(names)} models in {self.root}"

    # ------------------------------------------------------------------ publishing
    def _claim(self, name: str, version: int | None) -> tuple[int, Path]:
        """Claim a version directory with an exclusive mkdir; the next free one if ``None``."""
        self.check_name(name)
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        if version is not None:
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise ValueError(f"Expected a positive integer version; got {version!r}")
            try:
                (folder / str(version)).mkdir()
            except FileExistsError:
                raise VersionExists(f"Model {name!r} already has a version {version}") from None
            return version, folder / str(version)
        # Count directories too (a publish in progress has its directory but no file yet).
        taken = [int(e.name) for e in os.scandir(folder) if _VERSION.match(e.name)]
        candidate = max(taken, default=0) + 1
        while True:
            try:
                (folder / str(candidate)).mkdir()
                return candidate, folder / str(candidate)
            except FileExistsError:
                candidate += 1

    def publish(self, name: str, flow: nfcore.Flow, metadata: Mapping[str, Any] | None = None,
                *, version: int | None = None) -> int:
        """Save ``flow`` as the next version of ``name`` (or as ``version``); returns the version.

        Safe with concurrent publishers, in this process or others sharing the directory.
        """
        version, folder = self._claim(name, version)
        try:
            nfcore.save(flow, folder / ARTIFACT, metadata=metadata)
        except BaseException:
            _remove_empty(folder)
            raise
        self._versions_cache.pop(name, None)
        return version

    def publish_bytes(self, name: str, data: bytes, *, version: int | None = None) -> int:
        """Write already-validated artifact bytes as the next version (or ``version``)."""
        version, folder = self._claim(name, version)
        try:
            nfcore.atomic_write(folder / ARTIFACT, data)
        except BaseException:
            _remove_empty(folder)
            raise
        self._versions_cache.pop(name, None)
        return version


def _remove_empty(folder: Path) -> None:
    try:
        for leftover in folder.iterdir():
            if leftover.name.endswith(".tmp"):
                leftover.unlink(missing_ok=True)
        folder.rmdir()
    except OSError:
        pass


