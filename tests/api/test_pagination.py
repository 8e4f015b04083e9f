"""Cursor pagination: the list query each route reads, and a page cut from a list (no servers
needed; keyset paging in SQL is exercised on the real stack by the e2e list tests)."""

from dataclasses import dataclass
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from api.errors import install_error_handlers
from api.pagination import ListQuery, in_memory, list_query
from core.errors import NotFoundError
from core.wire.resources import CursorPage


@dataclass
class Item:
    id: str


ITEMS = [Item(f"i{n}") for n in range(5)]


def missing(item_id: str) -> NotFoundError:
    return NotFoundError(f"No item '{item_id}'.", param="after")


def cut(after: str | None, limit: int, order: str = "asc") -> list[str]:
    page = ListQuery(after, limit, "asc" if order == "asc" else "desc")
    return [item.id for item in in_memory(ITEMS, page, lambda item: item.id, missing)]


def test_a_list_in_memory_is_cut_after_its_cursor_one_past_the_page() -> None:
    assert cut(None, 2) == ["i0", "i1", "i2"]
    assert cut("i1", 2) == ["i2", "i3", "i4"]
    assert cut("i3", 2, "desc") == ["i2", "i1", "i0"]
    assert cut("i4", 2) == []
    with pytest.raises(NotFoundError):
        cut("nope", 2)


def test_a_page_keeps_its_limit_and_tells_whether_more_follow() -> None:
    page = CursorPage[Item].of(ITEMS[:3], 2)
    assert ([i.id for i in page.data], page.first_id, page.last_id) == (["i0", "i1"], "i0", "i1")
    assert page.has_more
    assert not CursorPage[Item].of(ITEMS[:2], 2).has_more
    empty = CursorPage[Item].of([], 2)
    assert (empty.first_id, empty.last_id, empty.has_more) == ("", "", False)


def app() -> TestClient:
    api = FastAPI()
    install_error_handlers(api)

    @api.get("/oldest")
    def oldest(page: Annotated[ListQuery, Depends(list_query())]) -> dict:
        return {"after": page.after, "limit": page.limit, "order": page.order}

    files = list_query(default_limit=10000, max_limit=10000, default_order="desc")

    @api.get("/files")
    def newest(page: Annotated[ListQuery, Depends(files)]) -> dict:
        return {"limit": page.limit, "order": page.order}

    @api.get("/batches")
    def batches(page: Annotated[ListQuery, Depends(list_query(default_order=None))]) -> dict:
        return {"limit": page.limit, "order": page.order}

    return TestClient(api)


def test_each_route_has_its_defaults() -> None:
    client = app()
    assert client.get("/oldest").json() == {"after": None, "limit": 20, "order": "asc"}
    assert client.get("/oldest?after=x&limit=3&order=desc").json() == {
        "after": "x",
        "limit": 3,
        "order": "desc",
    }
    assert client.get("/files").json() == {"limit": 10000, "order": "desc"}
    assert client.get("/batches?order=asc").json() == {"limit": 20, "order": "desc"}


@pytest.mark.parametrize(
    ("url", "param", "code", "message"),
    [
        (
            "/oldest?limit=0",
            "limit",
            "integer_below_min_value",
            "Invalid 'limit': integer below minimum value. Expected a value >= 1, but got 0 "
            "instead.",
        ),
        (
            "/files?limit=10001",
            "limit",
            "integer_above_max_value",
            "Invalid 'limit': integer above maximum value. Expected a value <= 10000, but got "
            "10001 instead.",
        ),
        (
            "/oldest?order=sideways",
            "order",
            "invalid_value",
            "Invalid value: 'sideways'. Supported values are: 'asc' and 'desc'.",
        ),
    ],
)
def test_bounds_are_refused_in_openai_words(url: str, param: str, code: str, message: str) -> None:
    response = app().get(url)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"], error["message"]) == (param, code, message)


def test_the_document_states_the_bounds_and_only_the_routes_parameters() -> None:
    paths = app().get("/openapi.json").json()["paths"]
    parameters = {
        path: {p["name"]: p["schema"] for p in item["get"]["parameters"]}
        for path, item in paths.items()
    }
    assert set(parameters["/batches"]) == {"after", "limit"}
    assert parameters["/files"]["limit"]["maximum"] == 10000
    assert parameters["/files"]["limit"]["default"] == 10000
    assert parameters["/oldest"]["order"]["enum"] == ["asc", "desc"]
    assert parameters["/oldest"]["order"]["default"] == "asc"
