"""Every knob of the service, from environment variables (prefix ``NFSERVE_``) or a ``.env`` file,
via pydantic-settings: paths, database and queue, batching, limits, keys, jobs and workers."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


def _split(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of the service. Each field is also the environment variable ``NFSERVE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="NFSERVE_", env_file=".env", extra="ignore")

    # Where things live
    host: str = Field("127.0.0.1", description="Address the API binds to.")
    port: int = Field(8000, description="Port the API listens on.")
    data_dir: Path = Field(Path("data"), description="Job database, queue, datasets, checkpoints.")
    models_dir: Path = Field(Path("models"), description="Model store: <name>/<version>/model.safetensors.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the job store; default: SQLite file in data_dir.")
    queue_url: str | None = Field(
        None, description="Huey queue: redis://… for RedisHuey; default: SqliteHuey in data_dir.")
    queue_name: str = Field(
        "nfserve", description="Huey queue name (Redis key prefix); one per deployment.")
    device: str = Field("auto", description="Inference/training device: auto, cpu, cuda, cuda:N.")

    # Inference and batching
    batching: bool = Field(True, description="Coalesce concurrent requests per model.")
    max_batch_rows: int = Field(65536, ge=1, description="Most rows run in one batched forward pass.")
    fast_path: bool = Field(
        True, description="Answer POST /log_prob and /sample from ASGI middleware over the same "
                          "protocol layer as the routes, without FastAPI's per-request routing "
                          "and dependency work.")
    max_queue_delay_ms: float = Field(2.0, ge=0, description="Longest wait to fill a batch.")
    run_idle_at_once: bool = Field(
        True, description="A request that finds its model idle (nothing queued, running or "
                          "unanswered) runs at once instead of waiting max_queue_delay_ms for "
                          "company; false: every batch waits (Triton's behaviour).")
    max_queued_rows: int = Field(4_000_000, ge=1, description="Rows waiting per model before 503.")
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline of an inference request.")
    max_queued_requests: int = Field(
        0, ge=0, description="Requests waiting per model before 503 (Triton's max_queue_size); "
                             "0: bounded by max_queued_rows only.")
    allow_timeout_override: bool = Field(
        True, description="Honour a request's own timeout_ms (below request_timeout_s): past it, "
                          "the request is dropped before compute and answered 408.")
    warmup_rows: int = Field(
        16, ge=0, description="Rows sampled and scored when a model loads, before it serves "
                              "(its first request then pays no warm-up); 0: no warm-up.")
    preload_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated models (latest version) loaded and "
                                          "warmed at start-up; '*' for every model.")
    model_cache_size: int = Field(16, ge=1, description="Loaded models held in the LRU cache.")
    torch_threads: int = Field(
        0, ge=0, description="Intra-op threads of the inference pass; 0: torch's default.")
    store_refresh_s: float = Field(
        0.0, ge=0, description="Seconds a model's version listing is reused without a stat: a "
                               "new version becomes the latest within this time (explicit "
                               "versions at once); 0: checked on every request.")

    # Limits on requests
    max_rows: int = Field(1_000_000, ge=1, description="Most rows in one /log_prob request.")
    max_sample_n: int = Field(1_000_000, ge=1, description="Largest n in one /sample request.")
    max_body_bytes: int = Field(128 * 2**20, ge=1, description="Largest request body, bytes.")
    max_upload_bytes: int = Field(256 * 2**20, ge=1, description="Largest model/dataset upload.")

    # Security
    api_keys_read: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated keys allowed to score, sample, list.")
    api_keys_write: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated keys allowed everything, uploads too.")

    # Jobs and workers
    embedded_worker: bool = Field(
        True, description="`serve` also starts one local worker process, restarted if it dies.")
    worker_threads: int = Field(1, ge=1, description="Huey thread workers per worker process.")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="How often a running job beats.")
    heartbeat_timeout_s: float = Field(
        15.0, gt=0, description="Beat age after which a job is stale and a worker not live.")
    max_retries: int = Field(2, ge=0, description="Re-queues of a job whose worker died.")
    checkpoint_every_s: float = Field(5.0, gt=0, description="Seconds between training checkpoints.")
    max_train_steps: int = Field(
        200_000, ge=1, description="Largest step budget of one job (a time budget alone has "
                                   "no step count, so this does not cap it).")
    max_train_seconds: float = Field(
        7 * 86_400.0, gt=0, description="Largest time budget of one job, in seconds.")
    plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Modules imported at start-up to register target plugins.")

    @field_validator("api_keys_read", "api_keys_write", "plugins", "preload_models",
                     mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        return _split(value)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys_read or self.api_keys_write)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'nfserve.db').resolve()}"

    @property
    def resolved_device(self) -> Literal["cpu", "cuda"] | str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once; tests override with ``app.dependency_overrides``."""
    return Settings()
