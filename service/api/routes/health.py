"""Liveness, readiness and Prometheus metrics. Always open, even when API keys are configured."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ...metrics import CONTENT_TYPE
from ..deps import MetricsDep
from ..schemas import CheckPublic, FastJSONResponse, HealthPublic

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=HealthPublic)
async def read_liveness() -> HealthPublic:
    """The process is up and its event loop answers."""
    return HealthPublic(status="ok")


@router.get("/health/ready", response_model=HealthPublic,
            responses={503: {"model": HealthPublic, "description": "A check failed"}})
def read_readiness(request: Request) -> Response:
    """Ready to serve: every check in app.state.readiness_checks passes (store readable, job store
    and queue reachable, a live worker for the jobs that wait, …)."""
    checks = []
    for check in request.app.state.readiness_checks:
        try:
            name, ok, detail = check()
        except Exception as e:  # a failing check is a failed check, not a 500
            name, ok, detail = getattr(check, "__name__", "check"), False, str(e)
        checks.append(CheckPublic(name=name, ok=ok, detail=detail))
    healthy = all(c.ok for c in checks)
    body = HealthPublic(status="ok" if healthy else "unavailable", checks=checks)
    return FastJSONResponse(body.model_dump(), status_code=200 if healthy else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {}},
                             "description": "Prometheus text format"}})
def read_metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics: requests, latency, batches, queue depth, model cache."""
    return Response(metrics.render(), media_type=CONTENT_TYPE)
