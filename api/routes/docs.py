"""Interactive API docs: Swagger UI from the pinned `swagger-ui-bundle-v2` package, served by the
API itself. Nothing comes from a CDN, so no other origin's script runs where the dashboard
keeps its key."""

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse
from starlette.exceptions import HTTPException
from swagger_ui_bundle import swagger_ui_path

from api.headers import page_policy

PAGE = Path(__file__).resolve().parent.parent / "static" / "docs.html"
DIST = Path(str(swagger_ui_path))
# In the assets' path: a new Swagger UI gets new addresses, so browsers may cache them for good.
VERSION = DIST.name.removeprefix("swagger-ui-")
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}

router = APIRouter(tags=["docs"], include_in_schema=False)


@lru_cache(maxsize=1)
def _page() -> tuple[str, str]:
    html = PAGE.read_text(encoding="utf-8").replace("{assets}", f"/docs/assets/{VERSION}")
    return html, page_policy(html)


@router.get("/docs", response_class=HTMLResponse)
async def docs_page() -> HTMLResponse:
    """Swagger UI over /openapi.json."""
    html, policy = _page()
    return HTMLResponse(
        html, headers={"Cache-Control": "no-cache", "Content-Security-Policy": policy}
    )


@router.get("/docs/assets/{version}/{name}")
async def docs_asset(version: str, name: str) -> FileResponse:
    """One of Swagger UI's files."""
    if version != VERSION or name not in ASSETS:
        raise HTTPException(404)
    return FileResponse(
        DIST / name,
        media_type=ASSETS[name],
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )
