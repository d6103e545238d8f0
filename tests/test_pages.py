"""`ImiChatClient.search_pages`: the one page-level method (number, items, total, last)."""

from __future__ import annotations

import imichat_async as imi
from imichat_async.sandbox import serve


def client_for(sb: object, **kw: object) -> imi.ImiChatClient:
    return imi.ImiChatClient(
        base_url=sb.base_url,  # type: ignore[attr-defined]
        token=sb.token,  # type: ignore[attr-defined]
        team_id=sb.team_id,  # type: ignore[attr-defined]
        **kw,  # type: ignore[arg-type]
    )


async def test_raw_pages_carry_number_total_last_and_the_objects_as_sent() -> None:
    """raw=True: the JSON objects as sent; every page has the total; only the last is last."""
    async with serve(chats=25, seed=41) as sb, client_for(sb) as client:
        pages = [p async for p in client.search_pages(raw=True)]
        data = list(sb.data)
    assert [p.number for p in pages] == [1, 2, 3]
    assert [p.total for p in pages] == [25, 25, 25]
    assert [p.last for p in pages] == [False, False, True]
    assert [r for p in pages for r in p.items] == data


async def test_decoded_pages_hold_chat_records() -> None:
    """Without raw, items are Chat records; a page has one name per field, no aliases."""
    async with serve(chats=15, seed=42) as sb, client_for(sb) as client:
        pages = [p async for p in client.search_pages(status="closed")]
        expected = sb.expected([("status", "eq", "closed")])
    chats = [c for p in pages for c in p.items]
    assert all(isinstance(c, imi.Chat) for c in chats)
    assert [c.chat_id for c in chats] == [c["chat_id"] for c in expected]
    public = {name for name in dir(pages[0]) if not name.startswith("_")}
    assert public == {"number", "items", "total", "last"}  # no `chats`/`page` (issue #25)


async def test_limit_requests_only_the_pages_it_needs() -> None:
    """limit=15 of 100 chats: two requests, 15 items, the second page marked last."""
    async with serve(chats=100, seed=43) as sb, client_for(sb, concurrency=8) as client:
        pages = [p async for p in client.search_pages(raw=True, limit=15, prefetch=8)]
        requests = sb.stats.requests_total
    assert [len(p.items) for p in pages] == [10, 5] and pages[-1].last
    assert requests == 2


async def test_stats_count_pages_past_the_end_without_a_total() -> None:
    """Without X-Total-Count the end is the first short page; stats count the wasted pages."""
    stats = imi.PagingStats()
    async with (
        serve(chats=35, seed=44, total_header=False) as sb,
        client_for(sb, concurrency=4) as client,
    ):
        pages = [p async for p in client.search_pages(raw=True, prefetch=4, stats=stats)]
    assert [p.total for p in pages] == [None] * 4
    assert [p.last for p in pages] == [False, False, False, True]
    assert stats.pages_yielded == 4 and stats.items_yielded == 35
    assert stats.pages_requested == 4 + stats.wasted and stats.wasted >= 1


async def test_page_size_is_the_vendors_ten() -> None:
    """client.page_size is the vendor page's 10 records a page (what export slices by)."""
    async with serve(chats=1, seed=45) as sb, client_for(sb) as client:
        assert client.page_size == 10


async def test_a_raw_value_other_than_false_true_or_text_is_refused_before_any_request() -> None:
    """`raw="texts"` (a typo) is not taken as `raw=True`: `InvalidQueryError` at the call,
    naming `raw` and the value, and the server sees no request."""
    async with serve(chats=5, seed=43) as sb, client_for(sb) as client:
        for bad in ("texts", "Text", 1, None):
            try:
                client.search_pages(raw=bad)  # type: ignore[call-overload]
            except imi.InvalidQueryError as exc:
                assert "raw" in str(exc) and repr(bad) in str(exc)
            else:
                raise AssertionError(f"raw={bad!r} was accepted")
        assert sb.stats.requests_total == 0
        texts = [r async for p in client.search_pages(raw="text") for r in p.items]
    assert [t.chat_id for t in texts] == [c["chat_id"] for c in sb.data]
