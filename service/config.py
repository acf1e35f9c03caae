"""Settings of the API and the workers: one class, read once per process from the environment.

Every variable is ``OMNET_<FIELD>`` (upper case), e.g. ``OMNET_BROKER_URL``.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration shared by ``omnet serve``, the API processes and the workers."""

    model_config = SettingsConfigDict(env_prefix="OMNET_", extra="ignore")

    storage_dir: Path = Field(
        Path("omnet-data"), description="folder shared by API and workers: uploads, results, DB"
    )
    broker_url: str | None = Field(
        None, description="Celery broker, e.g. redis://redis:6379/0; unset: embedded mode"
    )
    result_backend: str | None = Field(
        None, description="Celery result store; default: the Redis broker, or SQLite embedded"
    )
    database_url: str | None = Field(
        None, description="job records (SQLAlchemy URL); default: SQLite in storage_dir"
    )
    api_keys: str = Field("", description="comma-separated API keys, each 'key' or 'key:owner'")
    open_mode: bool = Field(False, description="accept requests without an API key")
    max_upload_mb: float = Field(1024.0, gt=0, description="largest request body")
    upload_idle_timeout_s: float = Field(
        30.0, gt=0, description="an upload whose body stops arriving this long is answered 408"
    )
    max_volume_mb: float = Field(
        1024.0, gt=0, description="largest decompressed NIfTI file (decompression-bomb guard)"
    )
    retention_hours: float = Field(72.0, gt=0, description="results are deleted after this")
    cleanup_interval_s: float = Field(300.0, gt=0, description="how often expired jobs are purged")
    checkpoint: str = Field(
        "",
        description="checkpoint file, or several separated by commas (an ensemble); "
        "default: the bundled model",
    )
    device: str = Field("auto", description="worker device: auto, cpu, cuda, cuda:N")
    batch_size: int = Field(16, ge=1, description="patches per forward pass in the worker")
    tiling: str = Field("paper", description="worker tiling: paper or fast")
    postprocess: str = Field(
        "paper",
        description="post-processing of jobs that ask for it: paper (small-component removal "
        "and K-means edema relabelling) or guarded (relabelling only in tumours with core)",
    )
    tta: bool = Field(False, description="test-time augmentation (8 mirrorings; 8x inference)")
    job_time_limit_s: float = Field(3600.0, gt=0, description="a job running longer fails")
    visibility_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Redis hands a message out again when its worker has not renewed it for "
        "this long (live workers renew theirs every heartbeat)",
    )
    broker_timeout_s: float = Field(
        5.0, gt=0, description="the API waits this long for the broker before answering 503"
    )
    stale_after_s: float = Field(
        120.0, gt=0, description="a running job whose worker is silent this long is taken over"
    )
    worker_heartbeat_s: float = Field(10.0, gt=0, description="worker liveness interval")
    queue_prefix: str = Field("omnet", description="queues are <prefix>.gpu and <prefix>.cpu")

    @field_validator("tiling")
    @classmethod
    def _known_tiling(cls, value: str) -> str:
        if value not in ("paper", "fast"):
            raise ValueError(f"tiling must be 'paper' or 'fast'; got {value!r}")
        return value

    @field_validator("postprocess")
    @classmethod
    def _known_postprocess(cls, value: str) -> str:
        if value not in ("paper", "guarded"):
            raise ValueError(f"postprocess must be 'paper' or 'guarded'; got {value!r}")
        return value

    @property
    def checkpoints(self) -> list[Path]:
        return [Path(p.strip()) for p in self.checkpoint.split(",") if p.strip()]

    @property
    def embedded(self) -> bool:
        """No broker configured: filesystem transport and SQLite, no external service."""
        return not self.broker_url

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{(self.storage_dir / 'jobs.sqlite').resolve()}"

    def keys(self) -> dict[str, str]:
        """API key -> owner name; a key given without ``:owner`` is its own owner, named
        by :func:`key_owner` (a digest of the whole key, never a prefix of it)."""
        out: dict[str, str] = {}
        for item in self.api_keys.split(","):
            item = item.strip()
            if not item:
                continue
            key, _, owner = item.partition(":")
            out[key.strip()] = owner.strip() or key_owner(key.strip())
        return out

    def queue(self, device_type: str) -> str:
        return f"{self.queue_prefix}.{'gpu' if device_type == 'cuda' else 'cpu'}"


def key_owner(key: str) -> str:
    """The owner name of an API key configured without one: ``key-`` and 16 hex digits
    of the key's SHA-256. Distinct keys get distinct owners (a collision needs 2**32
    keys), and the name shows nothing of the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once (tests replace them with dependency overrides)."""
    return Settings()
