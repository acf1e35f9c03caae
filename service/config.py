"""Settings of the API and the workers: one class, read once per process from the environment.

Every variable is ``OMNET_<FIELD>`` (upper case), e.g. ``OMNET_BROKER_URL``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.defaults import (
    DEFAULT_FUSION,
    DEFAULT_POSTPROCESS,
    DEFAULT_PRECISION,
    DEFAULT_TILING,
    DEFAULT_TTA,
    NO_POSTPROCESS,
    POSTPROCESS_MODES,
    PRECISIONS,
    TILING_NAMES,
    FusionRule,
    PostprocessMode,
    Precision,
    TilingName,
    TtaMode,
    describe_fusion,
    describe_postprocess,
    describe_tta,
    tiling_name,
    tta_mode,
)
from service.db import DATABASE_TIMEOUT_S
from service.endpoints import DicomWebEndpoint, parse_destinations, parse_endpoint
from service.redact import masked_url

#: Heartbeats a running job's worker has, at least, before the job counts as stale.
STALE_HEARTBEATS = 3

#: Post-processing modes a deployment may apply to the jobs that ask for post-processing
#: (a job that asks for none is segmented with ``NO_POSTPROCESS``).
SERVICE_POSTPROCESS_MODES: tuple[PostprocessMode, ...] = tuple(
    mode for mode in POSTPROCESS_MODES if mode != NO_POSTPROCESS
)


#: Settings that hold URLs, with a password in some deployments.
URL_FIELDS = ("broker_url", "result_backend", "database_url")


def _one_of(names: tuple[str, ...], mark: str = "'") -> str:
    """``'a', 'b' or 'c'``, each name between two ``mark``."""
    quoted = [f"{mark}{name}{mark}" for name in names]
    return " or ".join([", ".join(quoted[:-1]), quoted[-1]]) if len(quoted) > 1 else quoted[0]


class Settings(BaseSettings):
    """Configuration shared by ``omnet serve``, the API processes and the workers."""

    # Errors name the field, never its value: some values are secrets.
    model_config = SettingsConfigDict(
        env_prefix="OMNET_", extra="ignore", hide_input_in_errors=True
    )

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
        None,
        description="job records (SQLAlchemy URL); default: SQLite in storage_dir. Several hosts "
        "share a PostgreSQL one, `postgresql+psycopg://user:password@host/omnet` (the "
        "`postgres` extra, `pip install '.[postgres]'`; the Docker images have it)",
    )
    database_timeout_s: float = Field(
        DATABASE_TIMEOUT_S,
        gt=0,
        description="each wait for the job database gives up after this (a free pooled "
        "connection, connecting, each use of a connection, a SQLite write lock): the API "
        "then answers 503 `database_unavailable`, and a server cancels a statement, or "
        "ends a transaction left idle, this long",
    )
    api_keys: SecretStr = Field(
        SecretStr(""), description="comma-separated API keys, each 'key' or 'key:owner'"
    )
    open_mode: bool = Field(False, description="accept requests without an API key")
    max_upload_mb: float = Field(1024.0, gt=0, description="largest request body")
    upload_idle_timeout_s: float = Field(
        30.0, gt=0, description="an upload whose body stops arriving this long is answered 408"
    )
    max_volume_mb: float = Field(
        1024.0,
        gt=0,
        description="largest decompressed NIfTI file (decompression-bomb guard: a compressed "
        "upload "
        "is also refused as soon as it decompresses to more than its header declares)",
    )
    retention_hours: float = Field(72.0, gt=0, description="results are deleted after this")
    cleanup_interval_s: float = Field(
        300.0,
        gt=0,
        description="how often expired jobs are purged, and staging folders of uploads left "
        "by an API process that died (unchanged for 2 x `OMNET_JOB_TIME_LIMIT_S`, at least "
        "an hour) removed",
    )
    checkpoint: str = Field(
        "",
        description="checkpoint file, or several separated by commas (an ensemble); "
        "default: the bundled model",
    )
    device: str = Field("auto", description="worker device: auto, cpu, cuda, cuda:N")
    batch_size: int = Field(16, ge=1, description="patches per forward pass in the worker")
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads each worker process runs inference on (its OpenMP and MKL "
        "threads, set before PyTorch loads); unset: `OMP_NUM_THREADS` if set, else PyTorch's "
        "default, one per core. With several workers on one machine, workers x threads at "
        "most its cores",
    )
    tiling: Annotated[TilingName, BeforeValidator(tiling_name)] = Field(
        DEFAULT_TILING,
        description=f"worker tiling: {_one_of(TILING_NAMES, '`')} (see docs/method.md)",
    )
    postprocess: PostprocessMode = Field(
        DEFAULT_POSTPROCESS,
        description="post-processing of the jobs that ask for it (`postprocess=true`, the "
        f"API's default): {describe_postprocess(SERVICE_POSTPROCESS_MODES)}",
    )
    fusion: FusionRule = Field(
        DEFAULT_FUSION,
        description=f"how the worker's labels are made from the tasks: {describe_fusion()}",
    )
    tta: Annotated[TtaMode, BeforeValidator(tta_mode)] = Field(
        DEFAULT_TTA,
        description=f"test-time augmentation: {describe_tta()}; `true`, `false`: `all`, `off`",
    )
    precision: Precision = Field(
        DEFAULT_PRECISION,
        description=f"the network's arithmetic: {_one_of(PRECISIONS, '`')}; `auto` computes in "
        "bfloat16 on CPUs with AVX512-BF16 or AMX and float16 on CUDA, float32 elsewhere "
        "(the report's `inference.precision` says which)",
    )
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
        120.0,
        gt=0,
        description="a running job whose worker is silent this long is taken over; at least 3 x "
        "`OMNET_WORKER_HEARTBEAT_S` (fewer heartbeats would make live jobs look stale: "
        "`omnet serve` and `omnet worker` refuse to start, saying so)",
    )
    worker_heartbeat_s: float = Field(10.0, gt=0, description="worker liveness interval")
    max_attempts: int = Field(
        3,
        ge=1,
        description="times a job is started before it fails with `worker_lost`: each start after "
        "the "
        "first means the worker running it stopped (killed for memory, past a hard time "
        "limit), so a case that kills every worker it runs on is not started without end",
    )
    queue_prefix: str = Field("omnet", description="queues are <prefix>.gpu and <prefix>.cpu")
    webhook_secrets: SecretStr = Field(
        SecretStr(""),
        description="signing secrets of completion webhooks: comma-separated 'owner:whsec_...' "
        "(an owner named twice is signed with each secret, for rotation; owner '*': every "
        "owner without its own)",
    )
    webhook_allow_http: bool = Field(False, description="accept http:// callback URLs")
    webhook_allow_private: bool = Field(
        False,
        description="accept callback targets on loopback, private and other non-public "
        "addresses (link-local, multicast, unspecified and reserved ones are refused regardless)",
    )
    webhook_allowed_hosts: str = Field(
        "",
        description="comma-separated host names callbacks may target ('.example.org': it and "
        "its subdomains); empty: any host",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, description="one delivery attempt (connect, send, answer) gives up after this"
    )
    webhook_max_attempts: int = Field(15, ge=1, description="attempts per event before it fails")
    webhook_backoff_s: float = Field(
        10.0, gt=0, description="wait before the second attempt; doubled for each further one"
    )
    webhook_backoff_max_s: float = Field(3600.0, gt=0, description="longest wait between attempts")
    webhook_poll_s: float = Field(
        1.0, gt=0, description="how often each worker looks for webhook attempts that are due"
    )
    webhook_concurrency: int = Field(
        4, ge=1, description="webhook requests each worker process sends at a time"
    )

    dicomweb_source: SecretStr = Field(
        SecretStr(""),
        description="DICOMweb server (QIDO-RS and WADO-RS root, e.g. "
        "http://orthanc:8042/dicom-web) that jobs submitted by study_uid are retrieved from; "
        "credentials as http://user:password@host/...; empty: study_uid is refused",
    )
    dicomweb_destinations: SecretStr = Field(
        SecretStr(""),
        description="DICOMweb servers (STOW-RS roots) results of DICOM jobs are stored to: "
        "comma-separated 'name=url' (credentials in the URL as for the source); a job names "
        "its destinations, or gets all of them",
    )
    dicomweb_timeout_s: float = Field(
        120.0, gt=0, description="one DICOMweb request (search, retrieval of a series, store)"
    )
    dicomweb_retrieve_patience_s: float = Field(
        300.0,
        ge=0,
        description="how long a job waits for its DICOMweb source when the source cannot send the "
        "study (unreachable, timed out, HTTP 5xx or 429): it retries after 2, 4, 8, ... s"
        " (at most 30 s apart), its stage `waiting for the DICOMweb source`, then fails "
        "with `dicomweb_unavailable`; `0`: one attempt",
    )
    dicomweb_max_attempts: int = Field(
        10,
        ge=1,
        description="store attempts per destination before the delivery is marked failed (it can "
        "be "
        "re-triggered)",
    )
    dicomweb_backoff_s: float = Field(
        30.0,
        gt=0,
        description="wait before the second store attempt, doubled for each further one (at most "
        "`OMNET_WEBHOOK_BACKOFF_MAX_S`)",
    )
    dicom_series_rules: str = Field(
        "",
        description="site rules that recognise series, tried before the built-in ones: a JSON list "
        'like `[{"modality": "t1ce", "include": "mprage.*km", "exclude": "", "contrast": '
        "null}]` (regular expressions on the lower-case SeriesDescription, ProtocolName "
        "and SequenceName; `contrast` true/false: the series must (not) be post-contrast)",
    )
    max_study_mb: float = Field(
        4096.0, gt=0, description="largest DICOM study (uncompressed), uploaded or retrieved"
    )

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr() and str(): the secrets are SecretStr, and the URLs, which may hold a
        # password, are shown with it hidden.
        for name, value in super().__repr_args__():
            if name in URL_FIELDS and isinstance(value, str):
                value = masked_url(value)
            yield name, value

    @model_validator(mode="after")
    def _stale_after_heartbeats(self) -> Settings:
        # A live worker records a job's progress every heartbeat; a job is taken over when
        # it has been silent stale_after_s. With fewer heartbeats in that time, a live job
        # (or one beat held up by a busy database) looks dead and is taken over.
        least = STALE_HEARTBEATS * self.worker_heartbeat_s
        if self.stale_after_s < least:
            raise ValueError(
                f"OMNET_STALE_AFTER_S ({self.stale_after_s:g} s) must be at least "
                f"{STALE_HEARTBEATS} x OMNET_WORKER_HEARTBEAT_S ({self.worker_heartbeat_s:g} s) "
                f"= {least:g} s, or running jobs whose workers are alive look stale and are "
                "taken over; raise OMNET_STALE_AFTER_S or lower OMNET_WORKER_HEARTBEAT_S"
            )
        return self

    @field_validator("postprocess", mode="before")
    @classmethod
    def _known_postprocess(cls, value: object) -> object:
        if value not in SERVICE_POSTPROCESS_MODES:
            raise ValueError(
                f"postprocess must be {_one_of(SERVICE_POSTPROCESS_MODES)}; got {value!r} (a "
                "job asks for no post-processing itself, with postprocess=false)"
            )
        return value

    @field_validator("dicomweb_source", "dicomweb_destinations")
    @classmethod
    def _valid_dicomweb(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        text = value.get_secret_value()
        if info.field_name == "dicomweb_source":
            if text.strip():
                parse_endpoint("source", text)
        else:
            parse_destinations(text)
        return value

    @field_validator("dicom_series_rules")
    @classmethod
    def _valid_series_rules(cls, value: str) -> str:
        # Checked with the DICOM reader's own parser, imported only when rules are set,
        # so that reading settings does not load the DICOM stack.
        if value.strip():
            from model.io.dicom.classify import parse_series_rules

            parse_series_rules(value)
        return value

    @field_validator("webhook_secrets")
    @classmethod
    def _valid_webhook_secrets(cls, value: SecretStr) -> SecretStr:
        parse_webhook_secrets(value.get_secret_value())
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
        for item in self.api_keys.get_secret_value().split(","):
            item = item.strip()
            if not item:
                continue
            key, _, owner = item.partition(":")
            out[key.strip()] = owner.strip() or key_owner(key.strip())
        return out

    def queue(self, device_type: str) -> str:
        return f"{self.queue_prefix}.{'gpu' if device_type == 'cuda' else 'cpu'}"

    def webhook_secrets_of(self, owner: str) -> list[str]:
        """The secrets that sign ``owner``'s webhook events (the owner's own, else those
        of ``*``); empty when none is configured."""
        secrets = parse_webhook_secrets(self.webhook_secrets.get_secret_value())
        return secrets.get(owner) or secrets.get("*", [])

    def dicomweb_source_endpoint(self) -> DicomWebEndpoint | None:
        """The DICOMweb source, or None when studies cannot be retrieved."""
        text = self.dicomweb_source.get_secret_value().strip()
        return parse_endpoint("source", text) if text else None

    def dicomweb_destination_endpoints(self) -> dict[str, DicomWebEndpoint]:
        """Destination name -> endpoint, in the order configured."""
        return parse_destinations(self.dicomweb_destinations.get_secret_value())

    def webhook_hosts(self) -> tuple[str, ...]:
        """The host allowlist of callback URLs, lower case; empty: any host."""
        hosts = (h.strip().lower().rstrip(".") for h in self.webhook_allowed_hosts.split(","))
        return tuple(h for h in hosts if h)


def key_owner(key: str) -> str:
    """The owner name of an API key configured without one: ``key-`` and 16 hex digits
    of the key's SHA-256. Distinct keys get distinct owners (a collision needs 2**32
    keys), and the name shows nothing of the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


#: Prefix of Standard Webhooks secrets; base64 of the key bytes follows it.
SECRET_PREFIX = "whsec_"
#: Fewest key bytes of a webhook secret (Standard Webhooks recommends 24 to 64).
MIN_SECRET_BYTES = 24


def decode_webhook_secret(secret: str) -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret (padding optional).

    Raises:
        ValueError: not a ``whsec_`` secret, not base64, or shorter than 24 bytes.
    """
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret must start with {SECRET_PREFIX!r}")
    text = secret[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret must be 'whsec_' and base64") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(
            f"a webhook secret must hold at least {MIN_SECRET_BYTES} bytes; got {len(key)} "
            '(make one with: python -c "import base64, os; '
            "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\")"
        )
    return key


def parse_webhook_secrets(value: str) -> dict[str, list[str]]:
    """Owner -> webhook secrets from ``owner:whsec_...`` items separated by commas.

    Raises:
        ValueError: an item without an owner, or with a malformed secret (the message
            names the owner, never the secret).
    """
    out: dict[str, list[str]] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        owner, _, secret = item.partition(":")
        owner, secret = owner.strip(), secret.strip()
        if not owner or not secret:
            raise ValueError("webhook_secrets items are 'owner:whsec_...'")
        try:
            decode_webhook_secret(secret)
        except ValueError as exc:
            raise ValueError(f"webhook secret of owner {owner!r}: {exc}") from None
        out.setdefault(owner, []).append(secret)
    return out


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once (tests replace them with dependency overrides)."""
    return Settings()
