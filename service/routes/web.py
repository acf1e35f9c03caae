"""The web page for the people who run the service, and the API documentation.

``/`` submits cases and lists the caller's jobs, ``/view/{job_id}`` shows a finished
job's segmentation over its input (NiiVue), ``/docs`` is Swagger UI. Everything they
load is served from ``/static`` (``service/static``: the pages' own files in ``web/``,
the pinned third-party bundles in ``vendor/``, see ``scripts/fetch_web_assets.py``);
nothing comes from another host, which the pages' Content-Security-Policy enforces.
The pages call the ``/v1`` API from the browser with the key the user enters (kept in
the tab's sessionStorage), so the page routes themselves need no key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PAGES = STATIC_DIR / "web"
SWAGGER = "/static/vendor/swagger-ui"

#: The pages load scripts, styles and images from this server only; NiiVue reads the
#: volumes fetched from the API as blob: URLs and draws fonts from data: URLs.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self' data: blob:",
        "worker-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    return FileResponse(PAGES / name, media_type="text/html", headers=PAGE_HEADERS)


@router.get("/")
def jobs_page() -> FileResponse:
    """Enter an API key, submit a case, follow your jobs."""
    return _page("index.html")


@router.get("/view/{job_id}")
def viewer_page(job_id: str) -> FileResponse:
    """A finished job's segmentation over its input (the page reads the id from its URL)."""
    return _page("view.html")


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI, loaded from this server."""
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - API documentation",
        swagger_js_url=f"{root}{SWAGGER}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{SWAGGER}/swagger-ui.css",
        swagger_favicon_url=f"{root}{SWAGGER}/favicon-32x32.png",
    )


def install(app: FastAPI) -> None:
    """Adds the pages, /docs and /static to ``app`` (created with ``docs_url=None``)."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
