"""A bounded soak: every fault kind at once, concurrent searches, a token that keeps expiring.

One client runs several concurrent searches with different filters, iteration after iteration,
against a sandbox that injects 2007, 3454, 429 (Retry-After: 0), 502 (HTML), 503 (empty), 504,
connection resets and hangs (longer than the client's timeout), while the token expires every
`TOKEN_TTL` seconds or `TOKEN_MAX_USES` requests and is refreshed through an async callable.
Every search must return exactly the sandbox's own answer (same chats, same order, same
decoded fields), and neither memory nor open file descriptors may grow from the early
iterations to the late ones.

The default run is a few seconds; `pytest --soak` runs it for minutes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections import Counter
from datetime import datetime
from typing import Any

import pytest

import imichat_async as imi
from imichat_async import _protocol as protocol
from imichat_async import sandbox
from imichat_async._query import build_query
from imichat_async._records import decode_chat
from imichat_async._retry import RetryPolicy
from tests.helpers import assert_no_stray_tasks

try:  # psutil comes with the `bench` extra; without it: peak RSS and all sockets set aside
    import psutil
except ImportError:  # pragma: no cover
    import resource

    psutil = None

CONCURRENCY = 6
CHATS = 500
SHORT_ITERATIONS = 8
SOAK_ITERATIONS = 300
WARMUP = 2  # iterations before the baseline is taken (pools, caches, lazy imports settle)
TOKEN_TTL = 0.4  # seconds: several expiries per iteration
TOKEN_MAX_USES = 40
CLIENT_TIMEOUT = 0.5
RSS_MARGIN = 12 * 1024 * 1024  # bytes; allocator noise, not a per-iteration leak
FD_MARGIN = 2

FAULTS = sandbox.Faults(
    latency=0.002,
    jitter=0.006,
    p_2007=0.03,
    p_3454=0.03,
    p_429=0.03,
    retry_after=0,
    p_502=0.03,
    p_503=0.03,
    p_504=0.03,
    p_reset=0.03,
    p_hang=0.008,
    hang_seconds=1.0,  # above CLIENT_TIMEOUT: the client gives up and retries
)

# Several searches at once, each with its own filters (and one `or`).
SEARCHES: list[dict[str, Any]] = [
    {},
    {"status": "closed"},
    {
        "filters": [imi.Filter("channel", "eq", "sms"), imi.Filter("channel", "eq", "email")],
        "condition": "or",
    },
    {"created_at__gte": datetime(2024, 4, 1), "created_at__lt": datetime(2024, 10, 1)},
    {"tag": "vip", "status__not_eq": "queued"},
]


def expected_chats(sb: sandbox.Sandbox, search: dict[str, Any]) -> list[imi.Chat]:
    """The sandbox's own answer for `search`, decoded."""
    params = {k: v for k, v in search.items() if k not in ("filters", "condition")}
    query = build_query(params, search.get("filters"), search.get("condition", "and"))
    return [decode_chat(raw) for raw in sb.expected(list(query.filters), query.condition)]


def sandbox_socket_fds(port: int) -> tuple[set[int], int]:
    """Fds of TCP sockets to or from the sandbox (listener and both ends of the pool's
    connections, which come and go), and how many of them are the client's ends."""
    if psutil is None:  # pragma: no cover
        fds = {fd for fd in _open_fds() if _is_socket(fd)}
        return fds, 0
    conns = psutil.Process().net_connections(kind="tcp")
    fds = {
        c.fd
        for c in conns
        if (c.laddr and c.laddr.port == port) or (c.raddr and c.raddr.port == port)
    }
    client_ends = sum(1 for c in conns if c.raddr and c.raddr.port == port)
    return fds, client_ends


def _open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


def _is_socket(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    except OSError:
        return False


class Gauges:
    """Open fds (apart from the sandbox's sockets, which come and go) and RSS, at one moment."""

    def __init__(self, port: int) -> None:
        gc.collect()
        sockets, self.client_sockets = sandbox_socket_fds(port)
        self.fds = len(_open_fds() - sockets)
        self.sockets = len(sockets)
        if psutil is not None:
            self.rss = psutil.Process().memory_info().rss
        else:  # pragma: no cover
            self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak

    def __str__(self) -> str:
        return (
            f"fds {self.fds} (+{self.sockets} sandbox sockets, {self.client_sockets} the "
            f"client's), RSS {self.rss / 2**20:.1f} MiB"
        )


async def settle(sb: sandbox.Sandbox) -> None:
    """Wait for the server's handlers of abandoned (hung) requests to finish."""
    for _ in range(400):
        if sb.stats.in_flight == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{sb.stats.in_flight} server handlers never finished")


async def run_search(client: imi.ImiChatClient, search: dict[str, Any]) -> list[imi.Chat]:
    return [chat async for chat in client.search_chats(**search)]


async def test_soak_every_fault_concurrent_searches_expiring_token(
    soak: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Under all faults and token expiry, every search is exact and fds/RSS do not grow."""
    # pytest's log capture keeps every record, and each retry warning holds its exception (and
    # so its traceback and frames) alive: ~1 MiB per iteration that is the harness's, not the
    # library's. Measured without it, RSS stays flat over 30 iterations.
    caplog.set_level(logging.ERROR, logger="imichat_async")
    iterations = SOAK_ITERATIONS if soak else SHORT_ITERATIONS
    refresh_calls = 0

    async with sandbox.serve(
        chats=CHATS, seed=11, faults=FAULTS, token_ttl=TOKEN_TTL, token_max_uses=TOKEN_MAX_USES
    ) as sb:

        async def fresh_token() -> str:
            nonlocal refresh_calls
            refresh_calls += 1
            await asyncio.sleep(0.002)
            return await sb.new_token()

        expected = [expected_chats(sb, s) for s in SEARCHES]
        assert all(len(e) > CONCURRENCY * protocol.PAGE_SIZE for e in expected[:2])
        faults_seen: Counter[str] = Counter()
        records_checked = 0
        searches_checked = 0
        samples: list[Gauges] = []

        async with imi.ImiChatClient(
            base_url=sb.base_url,
            token=fresh_token,
            team_id=sb.team_id,
            concurrency=CONCURRENCY,
            timeout=CLIENT_TIMEOUT,
            retry_policy=RetryPolicy.testing(max_retries=12),
        ) as client:
            for i in range(iterations):
                before = Counter(sb.stats.faults)
                try:
                    results = await asyncio.gather(*(run_search(client, s) for s in SEARCHES))
                except imi.TokenExpiredError as exc:
                    pytest.fail(
                        f"BUG (iteration {i}): a search failed with {exc} although the token "
                        "callable always returns a valid token: ImiChatClient._fetch allows "
                        f"MAX_REFRESHES_PER_REQUEST refreshes over a page's whole life, so a "
                        "page whose retries outlive 3 tokens that each worked and then expired "
                        "normally (TTL or uses) fails; see "
                        "test_refresh_budget_counts_expiries_of_a_token_that_never_worked"
                    )
                for n, (got, want) in enumerate(zip(results, expected, strict=True)):
                    assert [c.chat_id for c in got] == [c.chat_id for c in want], (
                        f"iteration {i}, search {n}: chats lost, duplicated or out of order"
                    )
                    assert got == want, f"iteration {i}, search {n}: a record decoded differently"
                    records_checked += len(got)
                    searches_checked += 1
                faults_seen += Counter(sb.stats.faults) - before
                assert client.limiter.in_flight == 0
                await assert_no_stray_tasks()
                if i + 1 >= WARMUP:
                    await settle(sb)
                    samples.append(Gauges(sb.port))
                    assert samples[-1].client_sockets <= CONCURRENCY, (
                        f"iteration {i}: {samples[-1].client_sockets} client sockets to the "
                        f"sandbox, above the pool's limit of {CONCURRENCY}"
                    )

            stats = client.stats

        first, last = samples[0], samples[-1]
        # With --soak, compare a quarter of the way in with the end, so that a slow leak shows
        # as a trend rather than as start-up noise.
        early = samples[len(samples) // 4] if soak else first
        print(
            f"\nsoak: {iterations} iterations x {len(SEARCHES)} concurrent searches; "
            f"{searches_checked} searches and {records_checked} records checked exact; "
            f"requests {sb.stats.requests_total}, retries {stats.retries}, "
            f"faults injected and survived {dict(sorted(faults_seen.items()))} "
            f"(total {sum(faults_seen.values())}); token expiries (2004) {sb.stats.expired_hits}, "
            f"refreshes {stats.token_refreshes}, token callable calls {refresh_calls}; "
            f"start: {first}; early: {early}; end: {last}"
        )
        assert set(faults_seen) == set(sandbox.FAULT_KINDS), (
            f"not every fault kind was injected: {dict(faults_seen)}"
        )
        assert sb.stats.expired_hits > 0 and stats.token_refreshes > 1, "the token never expired"
        assert last.fds - early.fds <= FD_MARGIN, f"open fds grew: {early} -> {last}"
        assert last.rss - early.rss <= RSS_MARGIN, f"RSS grew: {early} -> {last}"


async def test_refresh_budget_counts_expiries_of_a_token_that_never_worked() -> None:
    """A page that outlives several tokens, each accepted then expired normally, still succeeds."""
    # Minimal form of what the soak hits: every token is good for one request (token_max_uses=1)
    # and the first request with each fresh token meets one transient 2007; the retry with the
    # same token then gets 2004. Every token worked (the server accepted it), so each expiry is
    # a normal one, not "a token that expires again right after a refresh".
    async with sandbox.serve(chats=5, seed=0, token_max_uses=1) as sb:
        armed = 0

        async def fresh_token() -> str:
            nonlocal armed
            if armed < 2:  # re-armed for the first tokens; a later one gets its answer
                sb.faults.fault_pages[1] = "2007"
                armed += 1
            return await sb.new_token()

        async with imi.ImiChatClient(
            base_url=sb.base_url,
            token=fresh_token,
            team_id=sb.team_id,
            concurrency=1,
            retry_policy=RetryPolicy.testing(),
        ) as client:
            try:
                got = [chat.chat_id async for chat in client.search_chats()]
            except imi.TokenExpiredError:
                pytest.fail(
                    "BUG: TokenExpiredError after "
                    f"{sb.stats.expired_hits} expiries of tokens that each had been accepted "
                    "by the server: client.ImiChatClient._fetch counts refreshes per page, for "
                    "the page's whole life (MAX_REFRESHES_PER_REQUEST = 2); it should only give "
                    "up when a freshly refreshed token is refused with 2004 before any other "
                    "answer (e.g. reset the count once an attempt with the token got a non-2004 "
                    "answer)"
                )
    assert got == [c["chat_id"] for c in sb.data]
    assert sb.stats.faults["2007"] == 2 and sb.stats.expired_hits == 2


async def test_a_page_does_not_cycle_through_tokens_forever() -> None:
    """Fresh tokens that expire before serving any page end in TokenExpiredError, bounded."""
    async with sandbox.serve(chats=5, seed=0, token_max_uses=1) as sb:

        async def fresh_token() -> str:
            sb.faults.fault_pages[1] = "2007"  # every token: one 2007, then expired on retry
            return await sb.new_token()

        async with imi.ImiChatClient(
            base_url=sb.base_url,
            token=fresh_token,
            team_id=sb.team_id,
            concurrency=1,
            retry_policy=RetryPolicy.testing(max_retries=3),
        ) as client:
            with pytest.raises(imi.TokenExpiredError):
                [chat.chat_id async for chat in client.search_chats()]
            refreshes = client.stats.token_refreshes
    assert refreshes == 2  # the first token and two fresh ones refused: then the error
