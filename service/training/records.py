"""The job store: SQLAlchemy tables of jobs, datasets and live workers, and the one ``transition``.

The database is the system of record. The queue only carries job ids; a worker *claims* a job with
one atomic ``UPDATE … WHERE status = 'queued'``, so a job runs at most once at a time however many
copies of its message the queue delivers. Every later change of a running job is fenced by its
``attempts`` counter, so a worker that lost its job (it was presumed dead and the job re-queued)
can no longer touch the row. ``Database.transition`` is the one place that writes such a change.

SQLite in ``data_dir`` is the default (WAL, busy timeout: the API and the worker are separate
processes); PostgreSQL is used by URL when several hosts share one deployment. Times are Unix
seconds (floats) written by the hosts' clocks; keep them in sync (NTP).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    ColumnElement,
    Float,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ..settings import Settings
from ..wire import JobStatus

__all__ = ["Base", "JobRecord", "DatasetRecord", "WorkerRecord", "Database", "new_id", "now"]


def now() -> float:
    return time.time()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Base(DeclarativeBase):
    pass


class JobRecord(Base):
    """One training job: what to train, where it stands, and what came of it."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    spec: Mapped[dict] = mapped_column(JSON)
    objective: Mapped[dict] = mapped_column(JSON)
    training: Mapped[dict] = mapped_column(JSON)  # the options as the client gave them

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
    summary: Mapped[dict | None] = mapped_column(JSON)  # the fit's summary, diagnostics included
    error: Mapped[str | None] = mapped_column(Text)


class DatasetRecord(Base):
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


class WorkerRecord(Base):
    """A worker process that is (or was lately) alive: it beats ``heartbeat_at`` while it runs,
    busy or idle, and removes its row when it stops."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)  # host:pid
    started_at: Mapped[float] = mapped_column(Float, default=now)
    heartbeat_at: Mapped[float] = mapped_column(Float, default=now)
    threads: Mapped[int] = mapped_column(Integer, default=1)
    device: Mapped[str] = mapped_column(String(32), default="cpu")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _add_missing_columns(conn: Connection) -> None:
    """Add the nullable columns a newer nfserve defines to tables an older one created, so an
    existing job store keeps working after an upgrade."""
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in have and column.nullable:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


class Database:
    """An engine and a session factory for one database URL.

    Example:
        >>> db = Database("sqlite://")
        >>> db.create_all()
        >>> with db.session() as s:
        ...     s.add(JobRecord(id="job_1", name="m", kind="density", spec={}, objective={},
        ...                     training={}))
        >>> db.claim("job_1", "host:1"), db.transition("job_1", JobStatus.SUCCEEDED, attempt=1)
        (1, True)
        >>> db.get_job("job_1").status, db.transition("job_1", JobStatus.FAILED, attempt=1)
        ('succeeded', False)
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
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(parsed, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(settings.resolved_database_url)

    def create_all(self) -> None:
        """Create the tables (and columns) that do not exist yet; safe when several processes
        start at once."""
        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as conn:
                conn.execute(text("SELECT pg_advisory_xact_lock(7243115001)"))
                Base.metadata.create_all(conn)
                _add_missing_columns(conn)
            return
        for attempt in range(5):  # the API and its embedded worker start at the same moment
            try:
                with self.engine.begin() as conn:
                    Base.metadata.create_all(conn)
                    _add_missing_columns(conn)
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

    # ------------------------------------------------------------------ job state
    @staticmethod
    def _transition(s: Session, job_id: str, to: JobStatus | None, *,
                    from_: JobStatus | Collection[JobStatus], attempt: int | None,
                    when: tuple[ColumnElement[bool], ...], values: dict[str, Any]) -> bool:
        sources = [from_] if isinstance(from_, JobStatus) else list(from_)
        t = now()
        values.setdefault("updated_at", t)
        if to is not None:
            values["status"] = to
            if to in JobStatus.final():
                values.setdefault("finished_at", t)
        fence = [JobRecord.id == job_id, JobRecord.status.in_(sources), *when]
        if attempt is not None:
            fence.append(JobRecord.attempts == attempt)
        result = s.execute(update(JobRecord).where(*fence).values(**values)
                           .execution_options(synchronize_session=False))
        return result.rowcount == 1

    def transition(self, job_id: str, to: JobStatus | None = None, *,
                   from_: JobStatus | Collection[JobStatus] = JobStatus.RUNNING,
                   attempt: int | None = None, when: tuple[ColumnElement[bool], ...] = (),
                   **values: Any) -> bool:
        """The one fenced change of a job: set ``values`` (and the status ``to``) only if the job
        is in ``from_`` (running, by default), still on ``attempt`` when given, and ``when``
        holds. Returns whether it changed the row; False means someone else changed it first.

        ``updated_at`` is stamped on every change and ``finished_at`` on a move to a final
        status. With ``to=None`` the status stays: a heartbeat or a progress report.
        """
        with self.session() as s:
            return self._transition(s, job_id, to, from_=from_, attempt=attempt, when=when,
                                    values=values)

    def claim(self, job_id: str, worker: str) -> int | None:
        """Move a queued job to running for ``worker``: the new attempt number, or None if
        another worker has it, it was cancelled, or it is finished."""
        t = now()
        with self.session() as s:
            if not self._transition(
                    s, job_id, JobStatus.RUNNING, from_=JobStatus.QUEUED, attempt=None,
                    when=(JobRecord.cancel_requested.is_(False),),
                    values={"worker": worker, "attempts": JobRecord.attempts + 1,
                            "heartbeat_at": t,
                            "started_at": func.coalesce(JobRecord.started_at, t)}):
                return None
            return s.scalar(select(JobRecord.attempts).where(JobRecord.id == job_id))

    def get_job(self, job_id: str) -> JobRecord | None:
        with self.session() as s:
            return s.get(JobRecord, job_id)

    def get_dataset(self, dataset_id: str) -> DatasetRecord | None:
        with self.session() as s:
            return s.get(DatasetRecord, dataset_id)

    def count_jobs(self) -> dict[str, int]:
        """Jobs by status."""
        with self.session() as s:
            rows = s.execute(select(JobRecord.status, func.count()).group_by(JobRecord.status))
            return {status: n for status, n in rows.all()}

    # ------------------------------------------------------------------ workers
    def beat_worker(self, name: str, *, threads: int, device: str) -> None:
        """Record that worker ``name`` is alive now (its row is created on the first beat)."""
        t = now()
        with self.session() as s:
            changed = s.execute(update(WorkerRecord).where(WorkerRecord.name == name)
                                .values(heartbeat_at=t)).rowcount
            if not changed:
                s.add(WorkerRecord(name=name, started_at=t, heartbeat_at=t, threads=threads,
                                   device=device))

    def drop_worker(self, name: str) -> None:
        with self.session() as s:
            s.execute(delete(WorkerRecord).where(WorkerRecord.name == name))

    def live_workers(self, timeout_s: float) -> list[WorkerRecord]:
        """Workers whose last beat is at most ``timeout_s`` old."""
        with self.session() as s:
            return list(s.scalars(select(WorkerRecord)
                                  .where(WorkerRecord.heartbeat_at >= now() - timeout_s)
                                  .order_by(WorkerRecord.name)))

    def forget_workers(self, older_than_s: float) -> int:
        """Delete the rows of workers silent for ``older_than_s`` (they died without a word)."""
        with self.session() as s:
            return s.execute(delete(WorkerRecord)
                             .where(WorkerRecord.heartbeat_at < now() - older_than_s)).rowcount
