"""What a search hands out: `ChatPage`s, or their items flattened, from the engine's pages.

Both are a `Flat` over the paging engine's generator (a class, not a second
async generator: see its docstring), so closing one closes the engine's once.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import attrs

from ._paging import Page, PagingStats
from ._records import Chat

T = TypeVar("T")
X = TypeVar("X")


@attrs.frozen
class ChatPage(Generic[T]):
    """One page of `search_pages`: its 1-based `number`, its `items` (`Chat` records, or with
    `raw=True` the JSON objects as sent), the server's `total` match count when it sent one,
    and `last`: True when no page follows. Without a total, a full page may still turn out
    to be the last (the next one came back empty): then the search ends after a page whose
    `last` is False.
    """

    number: int
    items: Sequence[T]
    total: int | None = None
    last: bool = False


class Flat(AsyncGenerator[X, None]):
    """The values of each page, flattened: `search_chats` and `search_pages` return one.

    A class, not a second async generator around the engine's: when
    `asyncio.run` ends with a search still suspended, the loop closes every
    live async generator at once, and an outer generator closing the inner one
    at the same moment fails with "aclose(): asynchronous generator is
    already running". With only the engine's generator alive, it is closed
    once. A dropped `Flat` drops the engine's generator, which the loop then
    closes as any other.
    """

    __slots__ = ("__weakref__", "_explode", "_items", "_pages")  # weakref: tracked like a generator

    def __init__(
        self, pages: AsyncGenerator[Page[Any], None], explode: Callable[[Page[Any]], Iterable[X]]
    ) -> None:
        self._pages = pages
        self._explode = explode
        self._items: Iterator[X] = iter(())

    def __aiter__(self) -> Flat[X]:
        return self

    async def __anext__(self) -> X:
        items = self._items
        for item in items:
            return item
        while True:
            self._items = items = iter(self._explode(await self._pages.__anext__()))
            for item in items:
                return item

    async def asend(self, value: None) -> X:
        return await self.__anext__()

    async def athrow(self, typ: Any, val: Any = None, tb: Any = None) -> X:
        """As a generator would: the exception ends the iteration (pages closed) and is raised."""
        await self.aclose()
        if val is None:
            raise typ() if isinstance(typ, type) else typ
        raise val

    async def aclose(self) -> None:
        self._items = iter(())
        await self._pages.aclose()


def chats_of(pages: AsyncGenerator[Page[Chat], None]) -> AsyncGenerator[Chat, None]:
    """Every chat of every page, in order (`search_chats`)."""
    return Flat(pages, _items_of)


def _items_of(page: Page[Chat]) -> Sequence[Chat]:
    return page.items


def numbered_pages(
    pages: AsyncGenerator[Page[Any], None], stats: PagingStats, limit: int | None
) -> AsyncGenerator[ChatPage[Any], None]:
    """The engine's pages as `ChatPage`s: `last` from the engine's stats, `limit` applied.

    `max_pages` already stops the engine at the page that reaches `limit`.
    """
    left = limit

    def number(page: Page[Any]) -> tuple[ChatPage[Any]]:
        nonlocal left
        items = page.items
        if left is not None:
            items = items[:left]
            left -= len(items)
        last = stats.last_page == page.number or left == 0
        return (ChatPage(page.number, items, page.total, last),)

    return Flat(pages, number)
