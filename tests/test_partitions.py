"""Partitions (`imichat_async.export`): a range planned into pieces, each read exactly."""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest

import imichat_async as imi
from imichat_async._retry import RetryPolicy
from imichat_async.export import Partition, plan_partitions, read_partition
from imichat_async.sandbox import Sandbox, serve

SINCE = "2024-01-01"
UNTIL = "2025-01-01"


def client_for(sb: Sandbox, **kwargs: Any) -> imi.ImiChatClient:
    kwargs.setdefault("retry_policy", RetryPolicy.testing(max_retries=10))
    return imi.ImiChatClient(base_url=sb.base_url, token=sb.token, team_id=sb.team_id, **kwargs)


def ids_in(sb: Sandbox, filters: list[tuple[str, str, str]]) -> set[str]:
    return {r["chat_id"] for r in sb.expected(filters)}


RANGE = [
    ("created_at", "gte", "2024-01-01T00:00:00Z"),
    ("created_at", "lt", "2025-01-01T00:00:00Z"),
]


async def test_partitions_cover_the_range_each_chat_once_within_the_target() -> None:
    """Planned from the totals: no partition above the target, together every chat once."""
    async with serve(chats=1200, seed=3) as sb, client_for(sb, concurrency=8) as client:
        parts = await plan_partitions(client, since=SINCE, until=UNTIL, rows_per_partition=150)
        assert len(parts) >= 1200 // 150
        assert all(p.estimate is not None and p.estimate <= 150 for p in parts)
        assert [p.lo for p in parts[1:]] == [p.hi for p in parts[:-1]]  # adjacent, in order
        seen: list[str] = []
        for p in parts:
            rows = await read_partition(client, p)
            assert len(rows) == p.estimate  # unchanged data: the total at planning time
            seen += [r["chat_id"] for r in rows]
        assert len(seen) == len(set(seen))
        assert set(seen) == ids_in(sb, RANGE)


async def test_reading_a_partition_twice_gives_the_same_rows() -> None:
    """An engine may retry a task: the same partition reads the same rows, in the same order."""
    async with serve(chats=400, seed=5, p_2007=0.1, p_503=0.05) as sb, client_for(sb) as client:
        parts = await plan_partitions(client, since=SINCE, until=UNTIL, rows_per_partition=100)
        first = await read_partition(client, parts[0])
        again = await read_partition(client, parts[0])
        assert first == again
        assert len(first) == parts[0].estimate


async def test_without_a_total_partitions_go_by_time() -> None:
    """No X-Total-Count: partitions span `span_without_total`, and still cover every chat."""
    from datetime import timedelta

    async with serve(chats=300, seed=7, total_header=False) as sb, client_for(sb) as client:
        parts = await plan_partitions(
            client, since=SINCE, until=UNTIL, span_without_total=timedelta(days=30)
        )
        assert len(parts) == 13  # 366 days of 2024, 30 a partition
        assert all(p.estimate is None for p in parts)
        got: list[str] = []
        for p in parts:
            got += [r["chat_id"] for r in await read_partition(client, p)]
        assert sorted(got) == sorted(ids_in(sb, RANGE))


async def test_filters_travel_with_the_partitions() -> None:
    """Keyword and explicit filters are in every partition, in wire form, and applied."""
    async with serve(chats=500, seed=11) as sb, client_for(sb) as client:
        parts = await plan_partitions(
            client,
            since=SINCE,
            until=UNTIL,
            rows_per_partition=40,
            filters=[imi.Filter("channel", "eq", "sms")],
            status=imi.ChatStatus.CLOSED,
        )
        assert all(
            p.filters == (("channel", "eq", "sms"), ("status", "eq", "closed")) for p in parts
        )
        got = [r for p in parts for r in await read_partition(client, p)]
        want = ids_in(sb, [*RANGE, ("channel", "eq", "sms"), ("status", "eq", "closed")])
        assert {r["chat_id"] for r in got} == want
        assert len(got) == len(want)


async def test_a_partition_is_picklable_and_json_round_trips_with_a_stable_id() -> None:
    """Same range and filters, same id; JSON and pickle give the same partition back."""
    p = Partition(10, 20, (("status", "eq", "closed"),), estimate=5)
    assert Partition(10, 20, (("status", "eq", "closed"),)).id == p.id
    assert Partition(10, 21, (("status", "eq", "closed"),)).id != p.id
    assert Partition.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert pickle.loads(pickle.dumps(p)) == p
    tampered = {**p.to_json(), "hi": 30}
    with pytest.raises(ValueError, match="does not match"):
        Partition.from_json(tampered)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"stauts": "closed"}, "stauts"),
        ({"status": "bogus"}, "bogus"),
        ({"limit": 5}, "limit"),
        (
            {
                "filters": [imi.Filter("status", "eq", "closed")],
                "channel": "sms",
                "condition": "or",
            },
            "condition",
        ),
    ],
)
async def test_bad_queries_fail_before_any_request(kwargs: dict[str, Any], named: str) -> None:
    """Unknown params, bad values, paging keywords, `or` across filters: refused up front."""
    async with serve(chats=10) as sb, client_for(sb) as client:
        with pytest.raises(imi.InvalidQueryError, match=named):
            await plan_partitions(client, since=SINCE, until=UNTIL, **kwargs)
        assert sb.stats.requests_total == 0
