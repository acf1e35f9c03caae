"""Health, readiness, the served model and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import CeleryDep, OwnerDep, SettingsDep, StorageDep, StoreDep
from service.errors import error_body
from service.schemas import Health, ServedModel

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health, summary="The API process is alive")
async def healthz() -> Health:
    # On the event loop, touching neither the database nor the broker: it answers while
    # they hang, and while every thread of the pool waits for them.
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"description": "broker, storage, database or workers missing"}},
    summary="Broker, storage, database and at least one worker answer",
)
def readyz(settings: SettingsDep, store: StoreDep, storage: StorageDep, celery: CeleryDep) -> Any:
    checks: dict[str, Any] = {}
    try:
        store.ping()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"failed: {type(exc).__name__}"
    checks["storage"] = "ok" if storage.writable() else "not writable"
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"failed: {type(exc).__name__}"
    try:
        live = store.live_workers(3 * settings.worker_heartbeat_s)
    except Exception:
        live = []
    checks["workers"] = len(live)
    ready = all(checks[k] == "ok" for k in ("database", "storage", "broker")) and live
    if not ready:
        body = error_body(
            "not_ready",
            "the service cannot take jobs yet: " + ", ".join(f"{k} {v}" for k, v in checks.items()),
        )
        return JSONResponse({**body, "checks": checks}, status_code=503)
    return Health(status="ready", checks=checks)


@router.get(
    "/v1/model", response_model=ServedModel, tags=["jobs"], summary="What the workers serve"
)
def served_model(settings: SettingsDep, store: StoreDep, _owner: OwnerDep) -> ServedModel:
    live = store.live_workers(3 * settings.worker_heartbeat_s)
    models: dict[str, dict[str, Any]] = {}
    for worker in live:
        models.setdefault(worker["model"].get("sha256", ""), worker["model"])
    workers = [
        {
            "name": w["name"],
            "device": w["device"],
            "queue": w["queue"],
            "model": w["model"].get("name"),
        }
        for w in live
    ]
    return ServedModel(workers=workers, models=list(models.values()))


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    from service.telemetry import REGISTRY

    jobs = generate_latest(request.app.state.job_metrics)
    return Response(generate_latest(REGISTRY) + jobs, media_type=CONTENT_TYPE_LATEST)
