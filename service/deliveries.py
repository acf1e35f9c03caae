"""Making the deliveries a job's state changes record: webhook events
(:mod:`service.webhooks`) and DICOMweb stores of its results (:mod:`service.dicomweb`).

Both kinds are rows of one outbox (:data:`service.db.deliveries`), written in the same
transaction as the state change that caused them, so none is lost nor made twice.
:func:`run_deliveries`, a thread of every worker process, claims those that are due
(:meth:`~service.db.JobStore.claim_deliveries`: one sender per attempt), makes each
attempt, and records what came of it: delivered, another attempt after an exponential
back-off (:func:`retry_delay`), or failed after the last allowed attempt.

The worker starts that thread (worker/tasks.py); nothing here imports the worker.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from service import dicomweb, webhooks
from service.config import Settings
from service.db import AttemptResult, Delivery, DeliveryStatus, JobStore, utcnow

logger = logging.getLogger(__name__)

#: Up to this fraction of each back-off is taken off at random, so that the retries of
#: many deliveries that failed together do not all arrive together.
JITTER = 0.2


@dataclass(frozen=True)
class _Kind:
    """How deliveries of one kind are attempted and retried."""

    name: str
    attempt: Callable[[Delivery, Settings], AttemptResult]
    max_attempts: int
    backoff_s: float
    cap_s: float


def _kind(delivery: Delivery, settings: Settings) -> _Kind:
    if dicomweb.is_store(delivery):
        return _Kind(
            "DICOMweb store",
            dicomweb.store_attempt,
            settings.dicomweb_max_attempts,
            settings.dicomweb_backoff_s,
            settings.webhook_backoff_max_s,
        )
    return _Kind(
        "webhook",
        webhooks.send_attempt,
        settings.webhook_max_attempts,
        settings.webhook_backoff_s,
        settings.webhook_backoff_max_s,
    )


def retry_delay(
    attempts: int,
    backoff_s: float,
    cap_s: float,
    retry_after_s: float | None = None,
    draw: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number ``attempts`` (1, 2, ...):
    ``backoff_s * 2**(attempts - 1)``, at most ``cap_s``, less up to :data:`JITTER` of
    it at random; at least the receiver's Retry-After (itself capped by ``cap_s``)."""
    delay = min(cap_s, backoff_s * 2.0 ** min(attempts - 1, 64))
    delay *= 1.0 - JITTER * draw()
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, cap_s))
    return delay


def deliver(delivery: Delivery, settings: Settings, store: JobStore) -> DeliveryStatus:
    """Makes the attempt that ``delivery`` was claimed for and records its outcome."""
    kind = _kind(delivery, settings)
    if delivery.attempts > kind.max_attempts:
        # The sender of the last allowed attempt stopped before recording it.
        result = AttemptResult(
            False,
            delivery.last_status_code,
            f"gave up after {kind.max_attempts} attempts "
            f"(the last: {delivery.last_error or 'interrupted'})",
            retry=False,
        )
    else:
        result = kind.attempt(delivery, settings)
    retry_at = None
    if result.delivered:
        status = DeliveryStatus.DELIVERED
    elif result.retry and delivery.attempts < kind.max_attempts:
        status = DeliveryStatus.PENDING
        delay = retry_delay(delivery.attempts, kind.backoff_s, kind.cap_s, result.retry_after_s)
        retry_at = utcnow() + timedelta(seconds=delay)
    else:
        status = DeliveryStatus.FAILED
    host = urlsplit(delivery.url).hostname or delivery.url  # a query may hold a token
    log = logger.info if status != DeliveryStatus.FAILED else logger.warning
    log(
        "%s %s (%s of job %s) to %s, attempt %d: %s%s",
        kind.name,
        delivery.id,
        delivery.event,
        delivery.job_id,
        host,
        delivery.attempts,
        status,
        f" ({result.error})" if result.error else "",
    )
    if not store.end_delivery(delivery, status, result.status_code, result.error, retry_at):
        logger.warning("%s: the claim expired before the outcome was recorded", delivery.id)
    return status


def run_deliveries(settings: Settings, store: JobStore, stop: threading.Event) -> None:
    """Makes the deliveries that are due until ``stop`` is set: looks for them every
    ``webhook_poll_s``, makes up to ``webhook_concurrency`` at a time (so one slow
    receiver does not hold up the others). A claim lasts long enough for an attempt; if
    this process dies during one, another sender takes the delivery up when it expires."""
    lease_s = 2 * max(settings.webhook_timeout_s, settings.dicomweb_timeout_s) + 60.0
    slots = settings.webhook_concurrency

    def attempt(delivery: Delivery) -> None:
        try:
            deliver(delivery, settings, store)
        except Exception:  # the claim expires and another attempt is made then
            logger.exception("delivery %s: the attempt failed unexpectedly", delivery.id)

    running: set[Future[Any]] = set()
    with ThreadPoolExecutor(slots, thread_name_prefix="delivery") as pool:
        while not stop.is_set():
            running = {f for f in running if not f.done()}
            if len(running) < slots:
                try:
                    for delivery in store.claim_deliveries(slots - len(running), lease_s):
                        running.add(pool.submit(attempt, delivery))
                except Exception:
                    logger.warning("looking for deliveries to make failed", exc_info=True)
            stop.wait(settings.webhook_poll_s)
