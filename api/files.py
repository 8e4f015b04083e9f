"""Files, stored in Postgres in chunks: uploads stream in and contents stream out, never whole.

Any API process can serve any file, so API processes scale out without a shared disk.
"""

from collections.abc import AsyncIterator
from datetime import timedelta

from fastapi import UploadFile
from pydantic import ValidationError
from sqlalchemy import ColumnElement, and_, delete, func, insert, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.limits import file_too_large
from api.pagination import ListQuery, keyset
from core.errors import InvalidRequestError, NotFoundError
from core.ids import new_id
from core.tables import ApiKey, FileChunk, Project, StoredFile
from core.validation import unstorable
from core.wire.resources import ExpiresAfter, FileDeleted, FileList, FileObject
from core.wire.wording import refused

CHUNK = 1 << 20
PURPOSES = ("batch",)
# The longest file name the files table holds.
MAX_FILENAME = 1024


def expires_after(anchor: str | None, seconds: str | None) -> ExpiresAfter | None:
    """An upload's `expires_after` from its form fields (`expires_after[anchor]` and
    `expires_after[seconds]`, as the SDK sends them); None if neither is given."""
    if anchor is None and seconds is None:
        return None
    given = {k: v for k, v in {"anchor": anchor, "seconds": seconds}.items() if v is not None}
    try:
        return ExpiresAfter.model_validate(given)
    except ValidationError as exc:
        errors = [{**e, "loc": ("expires_after", *e["loc"])} for e in exc.errors()]
        raise refused(errors) from None


def expiry(seconds: int | None) -> ColumnElement | None:
    """When a file made now expires, `seconds` from now; None: it does not."""
    return None if seconds is None else func.now() + literal(timedelta(seconds=seconds))


def live() -> ColumnElement[bool]:
    """Files neither deleted nor past their expiry."""
    return and_(
        StoredFile.deleted_at.is_(None),
        or_(StoredFile.expires_at.is_(None), StoredFile.expires_at > func.now()),
    )


async def upload(
    sessions: async_sessionmaker,
    key: ApiKey,
    upload: UploadFile,
    purpose: str,
    max_bytes: int,
    expires_after: ExpiresAfter | None = None,
) -> StoredFile:
    """Store an uploaded file chunk by chunk; 413 past `max_bytes`. It expires as
    `expires_after` says, or else as its project's `file_ttl_seconds` does."""
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
        if expires_after is not None:
            seconds: int | None = expires_after.seconds
        else:
            seconds = await session.scalar(
                select(Project.file_ttl_seconds).where(Project.name == key.project)
            )
        file.expires_at = expiry(seconds)
        session.add(file)
        seq = size = 0
        while data := await upload.read(CHUNK):
            size += len(data)
            if size > max_bytes:
                raise file_too_large(max_bytes)
            await session.execute(insert(FileChunk).values(file_id=file.id, seq=seq, data=data))
            seq += 1
        file.bytes = size
        await _read_expiry(session, file, seconds)
    return file


async def _read_expiry(session: AsyncSession, file: StoredFile, seconds: int | None) -> None:
    """The expiry the database computed (`seconds` from its now), read back while the session
    holds the file; a file that does not expire has nothing to read."""
    if seconds is not None:
        await session.flush()
        await session.refresh(file, ["expires_at"])


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
    expires_after: int | None = None,
) -> StoredFile | None:
    """A file made of `lines`, written chunk by chunk, expiring `expires_after` seconds from
    now if given; None if there are no lines."""
    file = StoredFile(
        id=new_id("file"),
        project=key_project,
        api_key_id=api_key_id,
        filename=filename,
        purpose=purpose,
        expires_at=expiry(expires_after),
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
    await _read_expiry(session, file, expires_after)
    return file


async def get(session: AsyncSession, key: ApiKey, file_id: str) -> StoredFile:
    """The caller's file; 404 otherwise."""
    file = await session.scalar(
        select(StoredFile).where(
            StoredFile.id == file_id, StoredFile.project == key.project, live()
        )
    )
    if file is None:
        raise NotFoundError(f"No such File object: {file_id}", param="file_id")
    return file


async def list_files(
    session: AsyncSession, key: ApiKey, purpose: str | None, page: ListQuery
) -> FileList:
    """A page of the caller's files, of one purpose if given."""
    query = select(StoredFile).where(StoredFile.project == key.project, live())
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
