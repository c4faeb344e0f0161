"""Regression tests for bugs the fuzz suite (tests/test_fuzz.py) found, one per fix."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from nexus.errors import NexusError
from nexus.events import EventType, quote
from nexus.patterns import parse_pattern
from nexus.testing import run_server


def test_a_quote_of_escaped_characters_stays_short() -> None:
    """`quote` bounds the escaped text, not the raw one: 100 NUL characters used to become a 400-character repr,
    and error messages quoting them grew past 500 characters."""
    for char in ("\x00", "\ud800", "\U0010ffff", "\n", "x"):
        quoted = quote(char * 300)
        assert len(quoted) <= 100 + 2 + len("... (300 characters)"), quoted
        assert quoted.endswith("... (300 characters)")
    assert quote("\x00\x01") == repr("\x00\x01")


@pytest.mark.parametrize(
    "text",
    [
        "\x00" * 2000,
        "a:b:v1:" + "\x00" * 2000,
        "v01:z_b_zza:" + "x" * 1800,
        "v7:x_1:" + "\U0001f600" * 2000,
    ],
)
def test_parse_errors_quote_a_little_of_the_input(text: str) -> None:
    """Event types and patterns with long bad tokens are refused with a message of at most 300 characters (the
    type is quoted to 60 characters, the bad token to 40)."""
    for parse in (EventType.parse, parse_pattern):
        with pytest.raises(NexusError) as caught:
            parse(text)
        assert 0 < len(caught.value.message) <= 300, caught.value.message


async def test_a_cancel_of_a_long_unknown_correlation_id_gets_a_short_error_frame() -> None:
    """A WebSocket cancel for a correlation_id of 5,000 characters is answered not_found with a short message and
    ref, instead of repeating the whole id (twice) in the error frame."""
    async with (
        run_server(gateway=True) as server,
        connect(server.ws_url, subprotocols=[Subprotocol("nexus.v1")]) as ws,
    ):
        assert json.loads(await ws.recv())["type"] == "connection"
        for correlation_id in ("é" * 5000, "\x00" * 5000):
            await ws.send(json.dumps({"type": "cancel", "correlation_id": correlation_id}))
            error = json.loads(await asyncio.wait_for(ws.recv(), 10.0))
            assert error["type"] == "error", error
            assert error["code"] == "not_found", error
            assert len(error["message"]) <= 300, error["message"]
            assert len(error["ref"]) <= 256
