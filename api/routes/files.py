from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import StreamingResponse

from api import files
from api.deps import ApiKeyDep, ContextDep, SessionDep
from api.errors import ERROR_RESPONSES
from api.pagination import ListQuery, list_query
from core.wire.resources import FileDeleted, FileList, FileObject

router = APIRouter(prefix="/v1", tags=["files"])

# OpenAI's files list: all of them (up to 10,000) unless asked for fewer, newest first.
FileListQuery = Annotated[
    ListQuery, Depends(list_query(default_limit=10000, max_limit=10000, default_order="desc"))
]


@router.post(
    "/files",
    response_model=FileObject,
    responses={**ERROR_RESPONSES, 413: ERROR_RESPONSES[400]},
)
async def create_file(
    key: ApiKeyDep,
    ctx: ContextDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
    anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
    seconds: Annotated[str | None, Form(alias="expires_after[seconds]")] = None,
) -> FileObject:
    """Uploads a file (JSON Lines for batches, up to 200 MiB unless configured otherwise)."""
    expires_after = files.expires_after(anchor, seconds)
    upload = await files.upload(
        ctx.sessions, key, file, purpose, ctx.settings.max_upload_bytes, expires_after
    )
    return FileObject.of(upload)


@router.get("/files", response_model=FileList, responses=ERROR_RESPONSES)
async def list_files(
    key: ApiKeyDep, session: SessionDep, page: FileListQuery, purpose: str | None = None
) -> FileList:
    """Lists the project's files."""
    return await files.list_files(session, key, purpose, page)


@router.get("/files/{file_id}", response_model=FileObject, responses=ERROR_RESPONSES)
async def retrieve_file(file_id: str, key: ApiKeyDep, session: SessionDep) -> FileObject:
    """Retrieves a file object."""
    return FileObject.of(await files.get(session, key, file_id))


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


@router.delete("/files/{file_id}", response_model=FileDeleted, responses=ERROR_RESPONSES)
async def delete_file(file_id: str, key: ApiKeyDep, session: SessionDep) -> FileDeleted:
    """Deletes a file."""
    return await files.remove(session, key, file_id)
