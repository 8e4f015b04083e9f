"""Files, stored in Postgres in chunks: uploads stream in and contents stream out, never whole.

Any API process can serve any file, so API processes scale out without a shared disk.
"""

from collections.abc import AsyncIterator

from fastapi import UploadFile
from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.limits import file_too_large
from api.pagination import ListQuery, keyset
from core.errors import InvalidRequestError, NotFoundError
from core.ids import new_id
from core.tables import ApiKey, FileChunk, StoredFile
from core.validation import unstorable
from core.wire.resources import FileDeleted, FileList, FileObject

CHUNK = 1 << 20
PURPOSES = ("batch",)
# The longest file name the files table holds.
MAX_FILENAME = 1024


async def upload(
    sessions: async_sessionmaker, key: ApiKey, upload: UploadFile, purpose: str, max_bytes: int
) -> StoredFile:
    """Store an uploaded file chunk by chunk; 413 past `max_bytes`."""
    if purpose not in PURPOSES:
        raise InvalidRequestError(
            f"Invalid value: '{purpose}'. Supported values are: 'batch'.",
            param="purpose",
            code="invalid_value",
        )
    name = upload.filename or "upload.jsonl"
    check_filename(name)
    file = StoredFile(
        id=new_id("file"), project=key.project, api_key_id=key.id, filename=name, purpose=purpose
    )
    async with sessions.begin() as session:
        session.add(file)
        seq = size = 0
        while data := await upload.read(CHUNK):
            size += len(data)
            if size > max_bytes:
                raise file_too_large(max_bytes)
            await session.execute(insert(FileChunk).values(file_id=file.id, seq=seq, data=data))
            seq += 1
        file.bytes = size
    return file


def check_filename(name: str) -> None:
    """Refuse a file name that is not a .jsonl one the files table can hold."""
    if len(name) > MAX_FILENAME:
        raise InvalidRequestError(
            f"Invalid 'file': file name too long. Expected a name with maximum length "
            f"{MAX_FILENAME}, but got a name with length {len(name)} instead.",
            param="file",
            code="string_above_max_length",
        )
    if unstorable(name) is not None:
        raise InvalidRequestError(
            "Invalid 'file': the file name holds a NUL character or an unpaired UTF-16 "
            "surrogate, which cannot be stored.",
            param="file",
            code="invalid_value",
        )
    if not name.endswith(".jsonl"):
        raise InvalidRequestError(
            "Files for batches must be JSON Lines with the .jsonl extension.", param="file"
        )


async def write_lines(
    session: AsyncSession,
    key_project: str,
    api_key_id: str,
    filename: str,
    purpose: str,
    lines: AsyncIterator[bytes],
) -> StoredFile | None:
    """A file made of `lines`, written chunk by chunk; None if there are no lines."""
    file = StoredFile(
        id=new_id("file"),
        project=key_project,
        api_key_id=api_key_id,
        filename=filename,
        purpose=purpose,
    )
    session.add(file)
    await session.flush()
    buffer = bytearray()
    seq = size = 0
    async for line in lines:
        buffer += line
        if len(buffer) >= CHUNK:
            await session.execute(
                insert(FileChunk).values(file_id=file.id, seq=seq, data=bytes(buffer))
            )
            seq, size, buffer = seq + 1, size + len(buffer), bytearray()
    if buffer:
        await session.execute(
            insert(FileChunk).values(file_id=file.id, seq=seq, data=bytes(buffer))
        )
        size += len(buffer)
    if size == 0:
        await session.delete(file)
        return None
    file.bytes = size
    return file


async def get(session: AsyncSession, key: ApiKey, file_id: str) -> StoredFile:
    """The caller's file; 404 otherwise."""
    file = await session.get(StoredFile, file_id)
    if file is None or file.project != key.project or file.deleted_at is not None:
        raise NotFoundError(f"No such File object: {file_id}", param="file_id")
    return file


async def list_files(
    session: AsyncSession, key: ApiKey, purpose: str | None, page: ListQuery
) -> FileList:
    """A page of the caller's files, of one purpose if given."""
    query = select(StoredFile).where(
        StoredFile.project == key.project, StoredFile.deleted_at.is_(None)
    )
    if purpose is not None:
        query = query.where(StoredFile.purpose == purpose)
    files = await keyset(
        session,
        query,
        StoredFile.created_at,
        StoredFile.id,
        page,
        lambda after: get(session, key, after),
    )
    return FileList.of([FileObject.of(file) for file in files], page.limit)


async def chunks(sessions: async_sessionmaker, file_id: str) -> AsyncIterator[bytes]:
    """A file's bytes, a chunk at a time, each read in a short session of its own.

    No connection is held while a chunk is on its way: a client that reads slowly keeps one
    chunk in memory, and nothing of the database pool.
    """
    seq = -1
    while True:
        async with sessions() as session:
            row = (
                await session.execute(
                    select(FileChunk.seq, FileChunk.data)
                    .where(FileChunk.file_id == file_id, FileChunk.seq > seq)
                    .order_by(FileChunk.seq)
                    .limit(1)
                )
            ).one_or_none()
        if row is None:
            return
        seq, data = row
        yield data


async def lines(
    sessions: async_sessionmaker, file_id: str, max_line: int | None = None
) -> AsyncIterator[bytes]:
    """A file's lines (without their line ends), read a chunk at a time.

    A line longer than `max_line` bytes comes cut to its first `max_line + 1`: enough to tell it
    is too long, without holding all of it.
    """
    rest = b""
    cut = False
    async for data in chunks(sessions, file_id):
        parts = data.split(b"\n")
        last = parts.pop()
        for part in parts:
            if not cut:
                yield _line(rest + part, max_line)
            rest, cut = b"", False
        if not cut:
            rest += last
            if max_line is not None and len(rest) > max_line + 1:
                yield rest[: max_line + 1]
                rest, cut = b"", True
    if rest and not cut:
        yield _line(rest, max_line)


def _line(raw: bytes, max_line: int | None) -> bytes:
    raw = raw.rstrip(b"\r")
    return raw if max_line is None else raw[: max_line + 1]


async def remove(session: AsyncSession, key: ApiKey, file_id: str) -> FileDeleted:
    file = await get(session, key, file_id)
    file.deleted_at = func.now()
    await session.execute(delete(FileChunk).where(FileChunk.file_id == file_id))
    await session.commit()
    return FileDeleted(id=file_id, deleted=True)
