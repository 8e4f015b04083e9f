"""Cursor pagination as OpenAI's list endpoints have it: the query (`after`, `limit`, `order`),
read by one dependency with each route's defaults, and how a page is cut: by (created_at, id)
in SQL, or from a list held in memory. The page itself is `core.wire.resources.CursorPage`.
"""

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal, Protocol, TypeVar, cast

from fastapi import Query
from sqlalchemy import Select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from core.errors import InvalidRequestError
from core.validation import check_range

Order = Literal["asc", "desc"]
ORDERS: tuple[Order, ...] = ("asc", "desc")
Row = TypeVar("Row")


@dataclass(frozen=True)
class ListQuery:
    """A list request's cursor: the last id of the page before, the page's size, its order."""

    after: str | None
    limit: int
    order: Order


def list_query(
    *, default_limit: int = 20, max_limit: int = 100, default_order: Order | None = "asc"
) -> Callable[..., ListQuery]:
    """The dependency reading a list route's `after`, `limit` (1..`max_limit`) and `order`, with
    the route's defaults. With `default_order=None` the route takes no `order`, as OpenAI's
    batches list: newest first.

    The bounds are checked here rather than by FastAPI, for OpenAI's words and the bare `param`.
    """
    limit_param = Query(json_schema_extra={"minimum": 1, "maximum": max_limit})
    order_param = Query(json_schema_extra={"enum": list(ORDERS)})

    def with_order(
        after: str | None = None,
        limit: Annotated[int, limit_param] = default_limit,
        order: Annotated[str, order_param] = default_order or "asc",
    ) -> ListQuery:
        check_range(limit, 1, max_limit, "limit")
        return ListQuery(after, limit, check_order(order))

    def newest_first(
        after: str | None = None, limit: Annotated[int, limit_param] = default_limit
    ) -> ListQuery:
        check_range(limit, 1, max_limit, "limit")
        return ListQuery(after, limit, "desc")

    return with_order if default_order is not None else newest_first


def check_order(order: str) -> Order:
    """`order` if it is asc or desc; OpenAI's 400 otherwise."""
    if order not in ORDERS:
        raise InvalidRequestError(
            f"Invalid value: '{order}'. Supported values are: 'asc' and 'desc'.",
            param="order",
            code="invalid_value",
        )
    return cast(Order, order)


class Positioned(Protocol):
    """A row's place in a list: when it was created, then its id."""

    @property
    def created_at(self) -> datetime: ...

    @property
    def id(self) -> str: ...


async def keyset(
    session: AsyncSession,
    query: Select[Row],
    created_at: InstrumentedAttribute[datetime],
    id_: InstrumentedAttribute[str],
    page: ListQuery,
    named: Callable[[str], Awaitable[Positioned]],
) -> Sequence[Row]:
    """Up to `page.limit + 1` rows of `query` past the row `named(page.after)` finds (it raises
    the route's 404 if none), in `page.order`: one more than a page, to tell whether more follow.
    """
    position = tuple_(created_at, id_)
    if page.after is not None:
        anchor = await named(page.after)
        cut = (anchor.created_at, anchor.id)
        query = query.where(position > cut if page.order == "asc" else position < cut)
    ordering = [c.asc() if page.order == "asc" else c.desc() for c in (created_at, id_)]
    return (await session.scalars(query.order_by(*ordering).limit(page.limit + 1))).all()


def in_memory(
    items: Sequence[Row],
    page: ListQuery,
    id_of: Callable[[Row], str],
    missing: Callable[[str], Exception],
) -> Sequence[Row]:
    """The same cut of a list already in memory (given oldest first): up to `page.limit + 1`
    items past the one named `after`, in `page.order`; `missing(after)` is raised if none is."""
    ordered = list(items) if page.order == "asc" else list(reversed(items))
    if page.after is not None:
        ids = [id_of(item) for item in ordered]
        if page.after not in ids:
            raise missing(page.after)
        ordered = ordered[ids.index(page.after) + 1 :]
    return ordered[: page.limit + 1]
