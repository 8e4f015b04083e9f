from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api import files, stored
from api.deps import ApiKeyDep, ContextDep, SessionDep
from api.errors import ERROR_RESPONSES
from core.tables import StoredFile
from core.wire.resources import FileDeleted, FileList, FileObject

router = APIRouter(prefix="/v1", tags=["files"])


@router.post(
    "/files",
    response_model=None,
    responses={200: {"model": FileObject}, **ERROR_RESPONSES, 413: ERROR_RESPONSES[400]},
)
async def create_file(
    key: ApiKeyDep,
    ctx: ContextDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> dict[str, Any]:
    """Uploads a file (JSON Lines for batches, up to 200 MiB unless configured otherwise)."""
    upload = await files.upload(ctx.sessions, key, file, purpose, ctx.settings.max_upload_bytes)
    return files.view(upload)


@router.get("/files", response_model=None, responses={200: {"model": FileList}, **ERROR_RESPONSES})
async def list_files(
    key: ApiKeyDep,
    session: SessionDep,
    purpose: str | None = None,
    limit: int = 10000,
    order: str = "desc",
    after: str | None = None,
) -> dict[str, Any]:
    """Lists the project's files."""
    stored.check_page(limit, order, max_limit=10000)
    query = select(StoredFile).where(
        StoredFile.project == key.project, StoredFile.deleted_at.is_(None)
    )
    if purpose is not None:
        query = query.where(StoredFile.purpose == purpose)
    position = (StoredFile.created_at, StoredFile.id)
    if after is not None:
        anchor = await files.get(session, key, after)
        cut = (anchor.created_at, anchor.id)
        query = query.where(position > cut if order == "asc" else position < cut)  # type: ignore[operator]
    ordering = [c.asc() if order == "asc" else c.desc() for c in position]
    rows = (await session.scalars(query.order_by(*ordering).limit(limit + 1))).all()
    return stored.page([files.view(f) for f in rows[:limit]], len(rows) > limit)


@router.get(
    "/files/{file_id}",
    response_model=None,
    responses={200: {"model": FileObject}, **ERROR_RESPONSES},
)
async def retrieve_file(file_id: str, key: ApiKeyDep, session: SessionDep) -> dict[str, Any]:
    """Retrieves a file object."""
    return files.view(await files.get(session, key, file_id))


@router.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}},
        **ERROR_RESPONSES,
    },
)
async def file_content(file_id: str, key: ApiKeyDep, ctx: ContextDep) -> StreamingResponse:
    """Streams a file's contents."""
    # A session of its own, closed before the first byte: a route's session would keep its
    # connection until the last byte reached the client, however slowly it reads.
    async with ctx.sessions() as session:
        file = await files.get(session, key, file_id)
    return StreamingResponse(
        files.chunks(ctx.sessions, file.id),
        media_type="application/jsonl",
        headers={"Content-Length": str(file.bytes)},
    )


@router.delete(
    "/files/{file_id}",
    response_model=None,
    responses={200: {"model": FileDeleted}, **ERROR_RESPONSES},
)
async def delete_file(file_id: str, key: ApiKeyDep, session: SessionDep) -> dict[str, Any]:
    """Deletes a file."""
    return await files.remove(session, key, file_id)
