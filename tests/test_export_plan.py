"""`imichat_async.export._plan`: ranges, slices and splits, without a server."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

import imichat_async as imi
from imichat_async.export import _plan as plan
from imichat_async.export._export import DEFAULT_SLICE_PAGES
from imichat_async.export._runner import FIRST_SLICES

UTC = timezone.utc
US_2024 = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z in microseconds since the epoch
DAY = 86_400_000_000


def test_instants_in_every_accepted_form_agree() -> None:
    """A datetime, a naive datetime, a date and ISO strings (Z, offset) give the same instant."""
    forms = [
        datetime(2024, 1, 1, tzinfo=UTC),
        datetime(2024, 1, 1),
        date(2024, 1, 1),
        "2024-01-01",
        "2024-01-01T00:00:00Z",
        "2024-01-01T01:00:00+01:00",
    ]
    assert {plan.to_us("since", f) for f in forms} == {US_2024}
    assert plan.fmt(US_2024 + 1) == "2024-01-01T00:00:00.000001Z"


@pytest.mark.parametrize("bad", ["yesterday", "", 12, None])
def test_a_bad_instant_names_the_argument(bad: object) -> None:
    """Anything but a datetime, date or ISO string raises InvalidQueryError naming it."""
    with pytest.raises(imi.InvalidQueryError, match="since"):
        plan.to_us("since", bad)


def test_cut_covers_the_window_without_gaps_or_overlaps() -> None:
    """`cut` gives adjacent windows from lo to hi, never more than the width allows."""
    parts = plan.cut(0, 10, 3)
    assert parts == [(0, 3), (3, 6), (6, 10)]
    assert plan.cut(0, 2, 5) == [(0, 1), (1, 2)]


def test_intervals_merge_and_report_gaps() -> None:
    """Done windows merge when they touch; gaps are what remains, in order."""
    done = plan.Intervals([(10, 20), (30, 40)])
    done.add(20, 25)
    assert done.items == [[10, 25], [30, 40]]
    assert done.gaps(0, 50) == [(0, 10), (25, 30), (40, 50)]
    assert done.gaps(12, 24) == []


def test_first_slices_give_every_worker_a_slice() -> None:
    """Two gaps and four workers: each gap is cut in two."""
    slices = plan.first_slices([(0, 100), (200, 300)], workers=4)
    assert [(s.lo, s.hi) for s in slices] == [(0, 50), (50, 100), (200, 250), (250, 300)]
    assert plan.first_slices([], workers=4) == []


def test_split_shares_the_estimate() -> None:
    """A split cuts into 2..256 pieces, each expecting its share of the total (rounded up)."""
    parts = plan.split(plan.Slice(0, 1000), pieces=3, estimate=100)
    assert [(p.lo, p.hi, p.estimate) for p in parts] == [
        (0, 333, 34),
        (333, 666, 34),
        (666, 1000, 34),
    ]
    assert len(plan.split(plan.Slice(0, 10**6), pieces=500, estimate=None)) == 256
    assert len(plan.split(plan.Slice(0, 10**6), pieces=1, estimate=None)) == 2


def test_pieces_for_total() -> None:
    """Deeper than slice_pages pages: enough pieces (with slack); otherwise no split."""
    assert plan.pieces_for_total(200, page_size=10, slice_pages=20) == 0
    assert plan.pieces_for_total(201, page_size=10, slice_pages=20) == 2  # 21 pages x 1.25 / 20
    assert plan.pieces_for_total(4000, page_size=10, slice_pages=20) == 25


def test_a_200000_chat_export_splits_each_first_slice_once_by_default() -> None:
    """#24: with the default depth (20 pages) the 8 first slices of 200,000 evenly spread
    chats (2,500 pages each) split once, into 157 slices of 16 pages, none split again:
    1,256 slices and 8 pages read only to learn a total. (At most 64 pieces a split took
    1,536 slices and 520 such pages: every child of the first split split again.)"""
    assert DEFAULT_SLICE_PAGES == 20 and FIRST_SLICES == 8
    first = plan.first_slices([(0, 8 * 10**9)], workers=FIRST_SLICES)
    slices, probes = 0, 0
    queue = [(s, 200_000 // len(first)) for s in first]
    while queue:
        s, total = queue.pop()
        pieces = plan.pieces_for_total(total, 10, DEFAULT_SLICE_PAGES)
        if not pieces:
            slices += 1
            continue
        probes += 1  # the first page told the total, and is read again by the children
        parts = plan.split(s, pieces, total)
        queue.extend((p, total // len(parts)) for p in parts)
    assert (len(first), probes, slices) == (8, 8, 1256)


def test_pieces_without_total_from_the_span_seen() -> None:
    """Records seen over a tenth of the window predict ten times as many in it."""
    s = plan.Slice(0, 1000)
    assert plan.pieces_without_total(s, 210, oldest=900, page_size=10, slice_pages=20) == 14
    assert plan.pieces_without_total(s, 210, oldest=None, page_size=10, slice_pages=20) == 2


def test_plan_range_freezes_now_and_narrows_by_created_at() -> None:
    """Without until the range ends at now, inclusive; created_at filters narrow it."""
    user = plan.UserQuery((imi.Filter("created_at", "lt", "2024-01-03"),), {"status": "closed"})
    r = plan.plan_range(user, US_2024 - DAY, None, now=US_2024 + 5 * DAY)
    assert (r.lo, r.hi, r.end_inclusive) == (US_2024 - DAY, US_2024 + 2 * DAY, False)
    r = plan.plan_range(plan.UserQuery(), US_2024, None, now=US_2024 + DAY)
    assert (r.hi, r.end_inclusive) == (US_2024 + DAY + 1, True)
    with pytest.raises(imi.InvalidQueryError, match="future"):
        plan.plan_range(plan.UserQuery(), US_2024, None, now=US_2024 - 1)
    with pytest.raises(imi.InvalidQueryError, match="before"):
        plan.plan_range(plan.UserQuery(), US_2024, US_2024, now=US_2024)


def test_a_slice_query_is_the_user_filters_plus_its_bounds() -> None:
    """The last slice of a frozen range is sent as `lte hi-1`; the others as `lt hi`."""
    user = plan.UserQuery((imi.Filter("channel", "eq", "sms"),), {"status": "closed"})
    r = plan.TimeRange(user, US_2024, US_2024 + DAY + 1, end_inclusive=True)
    inner = r.search_args(plan.Slice(US_2024, US_2024 + 10))
    last = r.search_args(plan.Slice(US_2024 + 10, US_2024 + DAY + 1))
    assert inner["status"] == "closed" and inner["condition"] == "and"
    assert inner["filters"][0] == imi.Filter("channel", "eq", "sms")
    assert inner["filters"][2].operator == "lt"
    assert last["filters"][2] == imi.Filter("created_at", "lte", datetime(2024, 1, 2, tzinfo=UTC))


def test_identity_is_canonical() -> None:
    """The same filters written differently have one identity (a resume recognises them)."""
    a = plan.UserQuery((imi.Filter("created_at", "gte", "2024-01-01"),), {"status": "closed"})
    b = plan.UserQuery(
        (), {"status": imi.ChatStatus.CLOSED, "created_at__gte": datetime(2024, 1, 1)}
    )
    assert a.identity() == b.identity()


def test_chat_key() -> None:
    """A str or int chat_id keys a record; anything else leaves it without a key."""
    assert plan.chat_key({"chat_id": "a"}) == "a"
    assert plan.chat_key({"chat_id": 7}) == "7"
    keyless: tuple[object, ...] = ({"chat_id": True}, {"chat_id": ""}, {}, [])
    assert [plan.chat_key(r) for r in keyless] == [None] * 4
