"""Scenario 3's material: sample pages, and the decoding variants measured on them.

`library` is what the client runs (`records.decode_page`: cattrs' generated
`Chat` hook, detailed validation off). `detailed` is the same generated hook
with detailed validation on (what names the failing field), for comparison.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from imichat_async import _protocol as protocol
from imichat_async import _records as records
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


def detailed_decoder() -> Decoder:
    """cattrs' generated `Chat` hook with detailed validation on (for comparison)."""
    structure = records.make_converter(detailed_validation=True).get_structure_hook(records.Chat)
    chat = records.Chat

    def decode(raws: Sequence[Mapping[str, Any]]) -> list[records.Chat]:
        return [structure(raw, chat) for raw in raws]

    return decode
