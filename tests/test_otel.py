"""OpenTelemetry against the sandbox: the SDK's in-memory span exporter and metric reader."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util.types import AnyValue

import imichat_async as imi
from imichat_async import sandbox
from imichat_async._retry import RetryPolicy

NO_WAIT = RetryPolicy.testing(max_retries=3)


class Telemetry:
    """A tracer and a meter provider recording in memory, and what they recorded."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def search_span(self) -> ReadableSpan:
        (span,) = [s for s in self.spans() if s.name == "imichat.search_chats"]
        return span

    def attempts(self) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.kind is SpanKind.CLIENT]

    def metrics(self) -> dict[str, list[Any]]:
        data = self.reader.get_metrics_data()
        out: dict[str, list[Any]] = {}
        assert data is not None
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    out[metric.name] = list(metric.data.data_points)
        return out

    def everything(self) -> str:
        """All spans and metrics as exported text, to search for secrets."""
        spans = "\n".join(s.to_json() for s in self.spans())
        data = self.reader.get_metrics_data()
        return spans + "\n" + (data.to_json() if data is not None else "")


def attributes_of(recorded: ReadableSpan | Event) -> Mapping[str, AnyValue]:
    """The attributes of a finished span or of an event (the SDK types them as optional)."""
    assert recorded.attributes is not None
    return recorded.attributes


@pytest.fixture
def otel() -> Iterator[Telemetry]:
    t = Telemetry()
    yield t
    t.tracer_provider.shutdown()
    t.meter_provider.shutdown()


def client_for(sb: sandbox.Sandbox, otel: Telemetry, **kw: Any) -> imi.ImiChatClient:
    kw.setdefault("token", sb.token)
    return imi.ImiChatClient(
        base_url=sb.base_url,
        team_id=sb.team_id,
        retry_policy=NO_WAIT,
        max_retries=NO_WAIT.max_retries,
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
        **kw,
    )


async def test_a_503_page_gives_one_search_span_and_a_child_per_attempt(otel: Telemetry) -> None:
    """One search span; one CLIENT child per attempt, the 503 and the 200s with their codes."""
    async with (
        sandbox.serve(chats=45, seed=3, fault_pages={3: "503"}) as sb,
        client_for(sb, otel, concurrency=2) as client,
    ):
        got = [chat async for chat in client.search_chats()]
    assert len(got) == 45
    search = otel.search_span()
    attempts = otel.attempts()
    assert len(attempts) == 6  # 5 pages, page 3 twice
    assert {a.parent.span_id for a in attempts if a.parent} == {search.context.span_id}
    assert all(a.context.trace_id == search.context.trace_id for a in attempts)
    by_key = {
        (attributes_of(a)["imichat.page"], attributes_of(a)["imichat.attempt"]): a for a in attempts
    }
    assert sorted(by_key) == [(1, 1), (2, 1), (3, 1), (3, 2), (4, 1), (5, 1)]
    failed = by_key[(3, 1)]
    assert attributes_of(failed)["http.response.status_code"] == 503
    assert attributes_of(failed)["error.type"] == "503"
    assert failed.status.status_code is StatusCode.ERROR
    for key, span in by_key.items():
        assert span.name == "POST"
        assert attributes_of(span)["http.request.method"] == "POST"
        assert attributes_of(span)["url.full"] == f"{sb.base_url}/chats/search?page={key[0]}"
        assert attributes_of(span)["server.address"] == "127.0.0.1"
        assert attributes_of(span)["server.port"] == sb.port
        if key != (3, 1):
            assert attributes_of(span)["http.response.status_code"] == 200
            assert attributes_of(span)["imichat.status_code"] == 4305
            assert "error.type" not in attributes_of(span)
    assert attributes_of(search)["imichat.search.pages"] == 5
    assert attributes_of(search)["imichat.search.records"] == 45
    assert search.status.status_code is StatusCode.UNSET
    (retry,) = [e for e in search.events if e.name == "imichat.retry"]
    assert attributes_of(retry)["imichat.page"] == 3
    assert sb.token not in otel.everything()


async def test_a_hedge_is_an_event_and_its_request_a_second_attempt(otel: Telemetry) -> None:
    """A hedged head page: one `imichat.hedge` event without attributes (as `_otel` says), and
    the duplicate's own POST span carries the page and attempt 2 (issue #25)."""
    async with (
        sandbox.serve(chats=400, seed=3, fault_pages={30: "hang"}, hang_seconds=2) as sb,
        client_for(sb, otel, concurrency=1) as client,
    ):
        got = [chat async for chat in client.search_chats()]
        hedges = client.stats.hedges
    assert len(got) == 400 and hedges == 1
    (hedge,) = [e for e in otel.search_span().events if e.name == "imichat.hedge"]
    assert not hedge.attributes
    pages = Counter(attributes_of(a)["imichat.page"] for a in otel.attempts())
    assert pages[30] >= 2 and all(n == 1 for page, n in pages.items() if page != 30)
    (second,) = [a for a in otel.attempts() if attributes_of(a)["imichat.attempt"] == 2]
    assert attributes_of(second)["imichat.page"] == 30  # the hedge, sent before the hang ends
    assert attributes_of(second)["imichat.status_code"] == 4305


async def test_metrics_count_requests_by_outcome_durations_and_records(otel: Telemetry) -> None:
    """Requests by outcome, one duration per attempt (seconds), records yielded."""
    async with (
        sandbox.serve(chats=45, seed=3, fault_pages={2: "503"}) as sb,
        client_for(sb, otel) as client,
    ):
        assert len([c async for c in client.search_chats()]) == 45
    metrics = otel.metrics()
    outcomes = {
        p.attributes["imichat.outcome"]: p.value for p in metrics["imichat.client.requests"]
    }
    assert outcomes == {"ok": 5, "transient": 1}
    durations = metrics["http.client.request.duration"]
    assert sum(p.count for p in durations) == 6
    assert {p.attributes.get("http.response.status_code") for p in durations} == {200, 503}
    assert all(p.attributes["server.address"] == "127.0.0.1" for p in durations)
    assert all(0 < p.sum < 60 for p in durations)  # seconds, not milliseconds
    (records,) = metrics["imichat.client.records"]
    assert records.value == 45


async def test_token_refresh_is_an_event_and_no_token_is_ever_recorded(otel: Telemetry) -> None:
    """A 2004 shows as an attempt (401, status_code 2004) and a refresh event; no token leaks."""
    issued: list[str] = []
    async with sandbox.serve(chats=40, seed=5, token_max_uses=2) as sb:

        async def token() -> str:
            issued.append(await sb.new_token())
            return issued[-1]

        async with client_for(sb, otel, token=token, concurrency=1) as client:
            got = [c async for c in client.search_chats(status__not_eq="queued")]
    assert got
    search = otel.search_span()
    assert [e.name for e in search.events].count("imichat.token_refresh") == len(issued) - 1 >= 1
    expired = [a for a in otel.attempts() if attributes_of(a).get("imichat.status_code") == 2004]
    assert expired
    assert all(attributes_of(a)["http.response.status_code"] == 401 for a in expired)
    pages_retried = {attributes_of(a)["imichat.page"] for a in expired}
    for page in pages_retried:
        attempts = [a for a in otel.attempts() if attributes_of(a)["imichat.page"] == page]
        assert max(cast(int, attributes_of(a)["imichat.attempt"]) for a in attempts) >= 2
    text = otel.everything()
    for secret in [sb.token, *issued]:
        assert secret not in text


async def test_filters_record_params_and_operators_never_values(otel: Telemetry) -> None:
    """The search span names param:operator pairs; a filter's value is customer data, not kept."""
    async with sandbox.serve(chats=20, seed=1) as sb, client_for(sb, otel) as client:
        async for _ in client.search_chats(
            email_id="cust-secret-77@example.com", status__not_eq="closed"
        ):
            pass
    search = otel.search_span()
    assert list(cast(Sequence[str], attributes_of(search)["imichat.search.filters"])) == [
        "email_id:eq",
        "status:not_eq",
    ]
    assert "cust-secret-77" not in otel.everything()


class _Open(SpanProcessor):
    """Counts spans started and not yet ended."""

    def __init__(self) -> None:
        self.open: Counter[str] = Counter()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.open[span.name] += 1

    def on_end(self, span: ReadableSpan) -> None:
        self.open[span.name] -= 1


async def test_break_ends_every_span_and_is_not_an_error(otel: Telemetry) -> None:
    """Leaving early ends the search span (not an error) and every attempt span in flight."""
    probe = _Open()
    otel.tracer_provider.add_span_processor(probe)
    async with (
        sandbox.serve(chats=300, seed=2, latency=0.01) as sb,
        client_for(sb, otel, concurrency=4) as client,
    ):
        async for _ in client.search_chats():
            break
    assert probe.open["POST"] == 0
    assert probe.open["imichat.search_chats"] == 0
    search = otel.search_span()
    assert search.status.status_code is StatusCode.UNSET
    assert attributes_of(search)["imichat.search.pages"] == 1
    assert len(otel.attempts()) >= 2  # the prefetched pages were started, then cancelled


async def test_a_failed_search_marks_its_span_with_the_error(otel: Telemetry) -> None:
    """A permanent error ends the search span with status ERROR and the error's type."""
    async with sandbox.serve(chats=20, seed=1) as sb, client_for(sb, otel, token="wrong") as client:
        with pytest.raises(imi.InvalidTokenError):
            async for _ in client.search_chats():
                pass
    search = otel.search_span()
    assert search.status.status_code is StatusCode.ERROR
    assert attributes_of(search)["error.type"] == "InvalidTokenError"
    (attempt,) = otel.attempts()
    assert attributes_of(attempt)["imichat.status_code"] == 2003


async def test_no_provider_configured_means_no_wrapping() -> None:
    """Without a configured provider the search is the engine's generator, not wrapped."""
    async with sandbox.serve(chats=20, seed=1) as sb:
        client = imi.ImiChatClient(base_url=sb.base_url, token=sb.token, team_id=sb.team_id)
        async with client:
            assert client._telemetry.start((), "and") is None
            pages = client.search_pages(raw=True)
            # unwrapped: the flattener holds the engine's own generator, not a tracing one
            assert pages._pages.ag_code.co_name == "iterate_pages"  # type: ignore[attr-defined]
            await pages.aclose()


def _run(*parts: str) -> dict[str, Any]:
    """Run the dedented parts as one script; its last line of output is JSON."""
    code = "\n".join(textwrap.dedent(part) for part in parts)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


_SEARCH = """
    async def search(**kw):
        async with sandbox.serve(chats=30, seed=1) as sb:
            async with imi.ImiChatClient(base_url=sb.base_url, token=sb.token,
                                         team_id=sb.team_id, **kw) as client:
                return len([c async for c in client.search_chats()])
"""


@pytest.mark.slow
def test_without_opentelemetry_installed_the_client_works_untouched() -> None:
    """opentelemetry not importable: plain methods, searches work, providers refused."""
    result = _run(
        """
        import asyncio, json, sys
        sys.modules["opentelemetry"] = None  # as if the extra were not installed
        import imichat_async as imi
        from imichat_async import _otel, sandbox
        from imichat_async._fetch import PageFetcher
        """,
        _SEARCH,
        """
        n = asyncio.run(search())
        try:
            imi.ImiChatClient(base_url="https://x.test", token="t", team_id="t",
                              tracer_provider=object())
            refused = False
        except imi.ConfigurationError:
            refused = True
        print(json.dumps({"available": _otel.AVAILABLE, "records": n, "refused": refused,
                          "wrapped": hasattr(PageFetcher._attempt, "__wrapped__")}))
        """,
    )
    assert result == {"available": False, "records": 30, "refused": True, "wrapped": False}


@pytest.mark.slow
def test_the_global_tracer_provider_is_used_when_none_is_given() -> None:
    """With only the global provider set (no tracer_provider=), searches are traced."""
    result = _run(
        """
        import asyncio, json
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import imichat_async as imi
        from imichat_async import sandbox
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        """,
        _SEARCH,
        """
        n = asyncio.run(search())
        names = sorted(s.name for s in exporter.get_finished_spans())
        print(json.dumps({"records": n, "names": names}))
        """,
    )
    assert result == {"records": 30, "names": ["POST", "POST", "POST", "imichat.search_chats"]}


def test_sync_client_searches_are_traced_with_the_same_parentage(otel: Telemetry) -> None:
    """Through the sync client (each step in its own task) attempts still nest under the search."""
    from imichat_async.sync import ImiChatClient
    from tests.sandbox_thread import ThreadedSandbox

    with (
        ThreadedSandbox(chats=45, seed=3, fault_pages={4: "503"}) as sb,
        ImiChatClient(
            base_url=sb.base_url,
            token=sb.token,
            team_id=sb.team_id,
            retry_policy=NO_WAIT,
            tracer_provider=otel.tracer_provider,
        ) as client,
    ):
        assert len(list(client.search_chats())) == 45
    search = otel.search_span()
    attempts = otel.attempts()
    assert len(attempts) == 6
    assert {a.parent.span_id for a in attempts if a.parent} == {search.context.span_id}
    assert attributes_of(search)["imichat.search.records"] == 45
