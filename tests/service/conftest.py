"""Fixtures of the service tests: Redis, a tiny checkpoint, a phantom case, process stacks.

The service tests run the real thing: uvicorn API processes, Celery worker processes on
a real Redis (``redis://127.0.0.1:6379/13`` by default, ``OMNET_TEST_REDIS_URL`` to
change it; flushed at the start) and ``omnet serve`` in embedded mode. Every module
gets its own storage folder and queue prefix; a failing test's report carries the
tails of the live processes' logs.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.net.checkpoint import save_checkpoint
from model.net.network import ArchConfig, build_model
from tests.service import support
from tests.service.support import LONG_SHAPE, Phantom, write_phantom_case

REDIS_URL = os.environ.get("OMNET_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
SHAPE = (48, 48, 32)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for s in support.ACTIVE:
            report.sections.append((f"service logs: {s.name}", s.tails()))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-4 OM-Net checkpoint (random weights, fixed seed): fast on a CPU."""
    torch.manual_seed(0)
    config = ArchConfig(width=4)
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny.pt", build_model(config), config
    ).resolve()


@pytest.fixture(scope="session")
def checkpoint_sha256(tiny_checkpoint: Path) -> str:
    return hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Phantom:
    return write_phantom_case(tmp_path_factory.mktemp("phantom"), "case", SHAPE, seed=3)


@pytest.fixture(scope="session")
def long_phantom(tmp_path_factory: pytest.TempPathFactory) -> Phantom:
    """A case whose job, under :data:`~tests.service.support.SLOW_JOB`, runs for seconds."""
    return write_phantom_case(tmp_path_factory.mktemp("long"), "long", LONG_SHAPE, seed=5)


# --------------------------------------------------------------------------- services
@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The test Redis database, emptied; skips the queue tests when Redis is absent."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(
            f"no Redis answers at {REDIS_URL} ({exc}); start one (redis-server) or set "
            "OMNET_TEST_REDIS_URL to run the queue tests"
        )
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def queue_prefix() -> str:
    """A queue prefix of this test session only."""
    return f"omnet-test-{uuid.uuid4().hex[:8]}"
