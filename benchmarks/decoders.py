"""Scenario 3's material: sample pages, and the decoding variants measured on them.

`library` is what the client runs (`records.decode_page`). `nondetailed` is an
experiment, not library code: the very same converter rules built by
`records.make_converter()`, but with cattrs' `detailed_validation` off, so the
generated structure function has no per-field try/except bookkeeping. It shows
what the fast path would cost if the detailed converter were kept only for the
slow path that names the failing field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cattrs

from imichat_async import protocol, records
from imichat_async.sandbox.data import ChatFactory

Decoder = Callable[[Sequence[Mapping[str, Any]]], list[records.Chat]]


def sample_pages(chats: int, seed: int = 1) -> tuple[list[bytes], list[list[dict[str, Any]]]]:
    """The sandbox's own records (quirks included) as page bodies and as parsed pages."""
    data, _ = ChatFactory(seed).generate(chats)
    bodies = []
    for start in range(0, len(data), protocol.PAGE_SIZE):
        doc = {
            "status_code": protocol.SUCCESS_CODE,
            "description": "The list of chats retrieved successfully",
            "response": data[start : start + protocol.PAGE_SIZE],
        }
        bodies.append(json.dumps(doc, separators=(",", ":")).encode())
    parsed = [json.loads(b)["response"] for b in bodies]
    return bodies, parsed


def library_decoder() -> Decoder:
    return records.decode_page


def nondetailed_decoder() -> Decoder:
    """The library's converter rules with `detailed_validation=False` (an experiment)."""
    original = cattrs.Converter

    def converter(**kwargs: Any) -> cattrs.Converter:
        kwargs["detailed_validation"] = False
        return original(**kwargs)

    cattrs.Converter = converter  # type: ignore[misc,assignment]
    try:
        conv = records.make_converter()
    finally:
        cattrs.Converter = original  # type: ignore[misc]
    structure = conv.get_structure_hook(records.Chat)
    chat = records.Chat

    def decode(raws: Sequence[Mapping[str, Any]]) -> list[records.Chat]:
        return [structure(raw, chat) for raw in raws]

    return decode


def handwritten_decoder() -> Decoder:
    """An experiment: one plain function per record for the common shapes, same results.

    Each field takes a fast path when it has the usual type (str, None, a list of
    str, a dict) and otherwise falls back to the library's converter for the whole
    record, so its rules and error messages stay the library's. Checked equal to
    the library on the sandbox's records (quirks included) before it is timed.
    """
    from datetime import datetime

    chat_cls, asset_cls = records.Chat, records.Asset
    statuses = {m.value: m for m in records.ChatStatus}
    channels = {m.value: m for m in records.Channel}
    fromiso = datetime.fromisoformat
    empty = records._EMPTY
    library = records.decode_page

    class _Slow(Exception):
        pass

    def text(v: Any) -> str | None:
        if v is None or v.__class__ is str:
            return v  # type: ignore[no-any-return]
        raise _Slow

    def when(v: Any) -> datetime | None:
        if v is None:
            return None
        if v.__class__ is str and v.endswith("Z") and len(v) >= 20:
            return fromiso(v)  # Python >= 3.11 reads the Z; the result is UTC-aware
        raise _Slow

    def one(o: Mapping[str, Any]) -> records.Chat:
        g = o.get
        chat_id = o["chat_id"]
        if chat_id.__class__ is not str or not chat_id:
            raise _Slow
        a = g("asset")
        if a is not None:
            if a.__class__ is not dict:
                raise _Slow
            aid, name = a.get("id"), a.get("name")
            if not (aid is None or aid.__class__ is int or aid.__class__ is str):
                raise _Slow
            a = asset_cls(aid, text(name))
        tag = g("tag")
        if tag is None:
            tag = []
        elif tag.__class__ is not list or not all(t.__class__ is str for t in tag):
            raise _Slow
        details = g("other_details")
        if details is None:
            details = empty
        elif details.__class__ is not dict:
            raise _Slow
        st, ch = g("status"), g("channel")
        if not (st is None or st.__class__ is str) or not (ch is None or ch.__class__ is str):
            raise _Slow
        return chat_cls(
            chat_id,
            text(g("alias_id")),
            when(g("created_at")),
            when(g("updated_at")),
            None if st is None else statuses.get(st, st),
            None if ch is None else channels.get(ch, ch),
            a,
            text(g("customer_id")),
            text(g("destination_id")),
            text(g("assignee")),
            text(g("flag")),
            tag,
            details,
        )

    def decode(raws: Sequence[Mapping[str, Any]], page: int | None = None) -> list[records.Chat]:
        try:
            return [one(raw) for raw in raws]
        except Exception:
            return library(raws, page)

    return decode
