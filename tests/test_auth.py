"""The token provider: static or callable, lazy first fetch, single-flight refresh, no leaks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from imichat_async._auth import TokenProvider
from imichat_async._errors import (
    ConfigurationError,
    ImiChatError,
    TokenExpiredError,
    TokenProviderError,
)

SECRET = "tok-SECRET-c0ffee"


class Source:
    """An async token callable returning tok-1, tok-2, ...; it yields to the loop each call."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls = 0
        self.fail_first = fail_first

    async def __call__(self) -> str:
        self.calls += 1
        for _ in range(3):
            await asyncio.sleep(0)
        if self.calls <= self.fail_first:
            raise RuntimeError("identity provider down")
        return f"{SECRET}-{self.calls}"


async def test_static_token() -> None:
    """A str token is returned as is and is not refreshable."""
    provider = TokenProvider(SECRET)
    assert await provider.get() == SECRET
    assert not provider.refreshable


async def test_static_token_refresh_explains_itself() -> None:
    """Refreshing a fixed token raises TokenExpiredError (2004/401) pointing to a callable."""
    provider = TokenProvider(SECRET)
    with pytest.raises(TokenExpiredError) as info:
        await provider.refresh(SECRET)
    assert (info.value.status_code, info.value.http_status) == (2004, 401)
    assert "fixed token" in str(info.value)
    assert "async callable" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("source", "match"),
    [("", "empty"), (None, "NoneType"), (42, "int"), (b"tok", "bytes")],
)
def test_bad_sources_rejected(source: Any, match: str) -> None:
    """An empty str or a non-callable is a ConfigurationError (an ImiChatError)."""
    with pytest.raises(ConfigurationError, match=match) as info:
        TokenProvider(source)
    assert isinstance(info.value, ImiChatError)


async def test_callable_first_token_fetched_lazily_once() -> None:
    """The callable is not called at construction; concurrent first get()s call it once."""
    source = Source()
    provider = TokenProvider(source)
    assert provider.refreshable
    assert source.calls == 0
    tokens = await asyncio.gather(*(provider.get() for _ in range(10)))
    assert set(tokens) == {f"{SECRET}-1"}
    assert source.calls == 1
    assert provider.refreshes == 0


async def test_concurrent_refreshes_of_the_same_token_call_once() -> None:
    """Many refresh(stale) at once: one call, every caller gets the same new token."""
    source = Source()
    provider = TokenProvider(source)
    stale = await provider.get()
    tokens = await asyncio.gather(*(provider.refresh(stale) for _ in range(8)))
    assert set(tokens) == {f"{SECRET}-2"}
    assert source.calls == 2
    assert provider.refreshes == 1


async def test_late_refresh_of_an_old_token_reuses_the_new_one() -> None:
    """refresh() with a token already replaced returns the current one without a call."""
    source = Source()
    provider = TokenProvider(source)
    first = await provider.get()
    second = await provider.refresh(first)
    assert await provider.refresh(first) == second
    assert source.calls == 2
    third = await provider.refresh(second)  # the new token expiring is a new refresh
    assert third == f"{SECRET}-3"
    assert provider.refreshes == 2


async def test_failed_refresh_propagates_and_can_be_retried() -> None:
    """A token callable failing raises TokenProviderError, its error chained; the next
    refresh calls it again."""
    source = Source(fail_first=2)
    provider = TokenProvider(source)
    with pytest.raises(TokenProviderError) as info:
        await provider.get()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "RuntimeError" in str(info.value)
    with pytest.raises(TokenProviderError):
        await provider.get()
    assert await provider.get() == f"{SECRET}-3"
    assert source.calls == 3


@pytest.mark.parametrize("bad", ["", None, 7, b"x"])
async def test_callable_returning_garbage(bad: Any) -> None:
    """A callable returning an empty or non-str token raises ConfigurationError."""

    async def source() -> Any:
        return bad

    provider = TokenProvider(source)
    with pytest.raises(ConfigurationError, match=r"must not be empty|must return a str"):
        await provider.get()


async def test_cancelled_refresh_does_not_wedge() -> None:
    """A refresh cancelled mid-call releases the lock; the next refresh works."""
    source = Source()
    provider = TokenProvider(source)
    stale = await provider.get()
    task = asyncio.ensure_future(provider.refresh(stale))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.wait_for(provider.refresh(stale), 1) == f"{SECRET}-3"


@pytest.mark.parametrize("kind", ["static", "callable"])
async def test_repr_hides_token(kind: str) -> None:
    """repr(provider) never shows the token, before or after it is fetched."""
    provider = TokenProvider(SECRET if kind == "static" else Source())
    await provider.get()
    assert "SECRET" not in repr(provider)
    assert kind in repr(provider)


async def test_get_waits_for_a_refresh_in_progress() -> None:
    """While a refresh runs, get() waits for the new token instead of the expired one."""
    gate = asyncio.Event()
    tokens = iter([f"{SECRET}-1", f"{SECRET}-2"])

    async def source() -> str:
        token = next(tokens)
        if token.endswith("-2"):
            await gate.wait()
        return token

    provider = TokenProvider(source)
    stale = await provider.get()
    refresh = asyncio.ensure_future(provider.refresh(stale))
    await asyncio.sleep(0)
    getter = asyncio.ensure_future(provider.get())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not getter.done()  # it does not hand out the token known to be expired
    gate.set()
    assert await getter == f"{SECRET}-2"
    assert await refresh == f"{SECRET}-2"


async def test_plain_callable_token_is_called() -> None:
    """A plain (non-async) callable returning a str is accepted: called, not awaited."""
    calls: list[int] = []

    def source() -> str:
        calls.append(1)
        return f"{SECRET}-{len(calls)}"

    provider = TokenProvider(source)
    assert await provider.get() == f"{SECRET}-1"
    assert await provider.refresh(f"{SECRET}-1") == f"{SECRET}-2"
    assert len(calls) == 2


async def test_same_token_again_fails_after_one_refresh() -> None:
    """A callable handing back the token that just expired fails at once, saying so, once."""
    calls: list[int] = []

    async def source() -> str:
        calls.append(1)
        await asyncio.sleep(0)
        return SECRET

    provider = TokenProvider(source)
    stale = await provider.get()
    results = await asyncio.gather(
        *(provider.refresh(stale) for _ in range(8)), return_exceptions=True
    )
    assert len(calls) == 2  # the first token, then one refresh for all eight
    for err in results:
        assert isinstance(err, TokenExpiredError)
        assert (err.status_code, err.http_status) == (2004, 401)
        assert "same token" in str(err)
        assert SECRET not in str(err)
    with pytest.raises(TokenExpiredError, match="same token"):
        await provider.get()  # no request goes out with the dead token
    assert len(calls) == 2


async def test_rearm_asks_the_callable_again_after_the_same_token() -> None:
    """After the callable handed back the expired token, `rearm()` (a new search) makes the
    next get() call it again; without it, get() fails at once without a call."""
    tokens = iter([SECRET, SECRET, f"{SECRET}-fresh"])

    async def source() -> str:
        return next(tokens)

    provider = TokenProvider(source)
    stale = await provider.get()
    with pytest.raises(TokenExpiredError, match="same token"):
        await provider.refresh(stale)
    with pytest.raises(TokenExpiredError, match="same token"):
        await provider.get()
    provider.rearm()
    assert await provider.get() == f"{SECRET}-fresh"
    provider.rearm()  # nothing dead: the fresh token is kept
    assert provider.ready() == f"{SECRET}-fresh"


async def test_ready_is_the_token_get_would_return_at_once() -> None:
    """`ready()`, the hot path's shortcut: None until the first token, None while a refresh
    runs or when the token is known dead (then `get()` must be awaited), else the token."""
    source = Source()
    provider = TokenProvider(source)
    assert provider.ready() is None
    first = await provider.get()
    assert provider.ready() == first
    refreshing = asyncio.ensure_future(provider.refresh(first))
    await asyncio.sleep(0)  # the refresh holds the lock, the callable not yet done
    assert provider.ready() is None
    second = await refreshing
    assert second != first and provider.ready() == second

    async def same() -> str:
        return SECRET

    dead = TokenProvider(same)
    stale = await dead.get()
    with pytest.raises(TokenExpiredError):
        await dead.refresh(stale)
    assert dead.ready() is None  # get() raises for it, saying so
    assert TokenProvider(SECRET).ready() == SECRET


# -- what the client's refresh budget relies on ------------------------------------------


def test_served_remembers_tokens_that_served_a_page() -> None:
    """mark_served(t) makes served(t) true; a token never marked is not served."""
    provider = TokenProvider(SECRET)
    assert not provider.served(SECRET)
    provider.mark_served(SECRET)
    provider.mark_served(SECRET)  # marking twice keeps one entry, not two
    assert provider.served(SECRET)
    assert not provider.served(f"{SECRET}-other")


def test_served_keeps_only_the_four_latest_tokens() -> None:
    """The served set is bounded (a long export refreshes often): the 5th token evicts the 1st."""
    provider = TokenProvider(SECRET)
    tokens = [f"{SECRET}-{i}" for i in range(1, 6)]
    for token in tokens[:4]:
        provider.mark_served(token)
    provider.mark_served(tokens[0])  # already known: no duplicate pushes another one out
    assert all(provider.served(t) for t in tokens[:4])
    provider.mark_served(tokens[4])
    assert [provider.served(t) for t in tokens] == [False, True, True, True, True]


async def test_on_refresh_is_called_once_per_real_refresh() -> None:
    """on_refresh fires for each call of the token callable after a 2004, not for the first
    token nor for a late refresh that reuses the new token."""
    calls: list[int] = []
    source = Source()
    provider = TokenProvider(source, on_refresh=lambda: calls.append(source.calls))
    stale = await provider.get()
    assert calls == []
    await asyncio.gather(*(provider.refresh(stale) for _ in range(5)))
    assert calls == [2]
    await provider.refresh(stale)  # late: already refreshed
    assert calls == [2]
    await provider.refresh(await provider.get())
    assert calls == [2, 3]
    assert provider.refreshes == 2


@pytest.mark.parametrize(
    "token",
    [
        f" {SECRET}",
        f"{SECRET}\n",
        f"{SECRET}\t",
        f"tok\x00{SECRET}",
        f"tok\x1f{SECRET}",
        f"tok\x7f{SECRET}",
    ],
    ids=["leading-space", "trailing-newline", "trailing-tab", "nul", "unit-sep", "del"],
)
def test_token_with_whitespace_or_control_chars_rejected(token: str) -> None:
    """Surrounding whitespace or a control character (0x00-0x1f, 0x7f) is refused, unshown."""
    with pytest.raises(ConfigurationError, match="whitespace or control characters") as info:
        TokenProvider(token)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("token", ["a b", "tok~+/=", "t\x80k"], ids=["space", "b64", "latin1"])
async def test_token_edge_characters_accepted(token: str) -> None:
    """The boundaries are exact: an inner space (0x20), '~' (0x7e) and 0x80 pass as they are."""
    assert await TokenProvider(token).get() == token
