"""The job store: SQLAlchemy models for jobs, models and datasets, and session helpers.

The database is the system of record. The queue only carries job ids; a worker *claims* a job with
one atomic ``UPDATE … WHERE status = 'queued'``, so a job runs at most once at a time however many
copies of its message the queue delivers. Every later write of a running job is fenced by its
``attempts`` counter, so a worker that lost its job (it was presumed dead and the job re-queued)
can no longer touch the row.

SQLite in ``data_dir`` is the default (WAL, busy timeout: the API and the worker are separate
processes); PostgreSQL is used by URL when several hosts share one deployment. Times are Unix
seconds (floats) written by the workers' clocks; keep the hosts' clocks in sync (NTP).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

__all__ = [
    "Base", "Job", "ModelRecord", "Dataset", "Database", "JOB_STATUSES", "ACTIVE_STATUSES",
    "FINAL_STATUSES", "new_id", "now",
]

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")
FINAL_STATUSES = ("succeeded", "failed", "cancelled")


def now() -> float:
    return time.time()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Base(DeclarativeBase):
    pass


class Job(Base):
    """One training job: what to train, where it stands, and what came of it."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    spec: Mapped[dict] = mapped_column(JSON)
    objective: Mapped[dict] = mapped_column(JSON)
    training: Mapped[dict] = mapped_column(JSON)

    created_at: Mapped[float] = mapped_column(Float, default=now)
    updated_at: Mapped[float] = mapped_column(Float, default=now)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    step: Mapped[int | None] = mapped_column(Integer)
    total: Mapped[int | None] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    elapsed: Mapped[float | None] = mapped_column(Float)
    eta: Mapped[float | None] = mapped_column(Float)
    resumed_from: Mapped[int | None] = mapped_column(Integer)

    result_name: Mapped[str | None] = mapped_column(String(128))
    result_version: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


class ModelRecord(Base):
    """A published model version (the file lives in the model store)."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_models_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str | None] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str | None] = mapped_column(String(80))
    summary: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Dataset(Base):
    """An uploaded training set, stored as ``data_dir/datasets/<id>.safetensors``."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    filename: Mapped[str | None] = mapped_column(String(256))
    format: Mapped[str] = mapped_column(String(16))
    rows: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    context_dim: Mapped[int] = mapped_column(Integer, default=0)
    dtype: Mapped[str] = mapped_column(String(16))
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(80))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=now)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


class Database:
    """An engine and a session factory for one database URL.

    Example:
        >>> db = Database("sqlite://")
        >>> db.create_all()
        >>> with db.session() as s:
        ...     s.scalar(select(Job).limit(1)) is None
        True
    """

    def __init__(self, url: str, *, echo: bool = False):
        parsed = make_url(url)
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.url = parsed
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
            if parsed.database:
                from pathlib import Path

                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(parsed, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Any) -> Database:
        return cls(settings.resolved_database_url)

    def create_all(self) -> None:
        """Create the tables that do not exist yet; safe when several processes start at once."""
        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as conn:
                conn.execute(text("SELECT pg_advisory_xact_lock(7243115001)"))
                Base.metadata.create_all(conn)
            return
        for attempt in range(5):  # the API and its embedded worker start at the same moment
            try:
                Base.metadata.create_all(self.engine)
                return
            except (OperationalError, ProgrammingError):
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self._sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def ping(self) -> None:
        """Raise if the database is unreachable."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ job state transitions
    def claim(self, job_id: str, worker: str) -> int | None:
        """Atomically move a queued job to running; the new attempt number, or None if another
        worker has it, it was cancelled, or it is finished."""
        t = now()
        with self.session() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == "queued", Job.cancel_requested.is_(False))
                .values(status="running", worker=worker, attempts=Job.attempts + 1,
                        heartbeat_at=t, updated_at=t, started_at=func.coalesce(Job.started_at, t))
                .execution_options(synchronize_session=False)
            )
            if res.rowcount != 1:
                return None
            return s.scalar(select(Job.attempts).where(Job.id == job_id))

    def fenced_update(self, job_id: str, attempt: int, **values: Any) -> bool:
        """Update a running job only if this attempt still owns it; False if it lost the job."""
        values.setdefault("updated_at", now())
        with self.session() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.attempts == attempt, Job.status == "running")
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            return res.rowcount == 1

    def get_job(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def get_dataset(self, dataset_id: str) -> Dataset | None:
        with self.session() as s:
            return s.get(Dataset, dataset_id)
