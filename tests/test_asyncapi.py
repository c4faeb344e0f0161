"""The AsyncAPI 3.0 document of the gateway (``nexus docs asyncapi``, ``/asyncapi.json``): valid for the AsyncAPI
project's own parser, and faithful to the protocol and to what each handler declares and gets."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from nexus.gateway.asyncapi import asyncapi_document, message_id, render_asyncapi
from nexus.gateway.protocol import ERRORS
from node_support import node_with, run_script

from nexus import EventHandler, EventSpec, Stream, StreamingEventHandler
from nexus.eventdocs import HandlerClass
from nexus.events import Event
from nexus.plugins import discover

PARSER = "@asyncapi/parser"


def built_in_handlers() -> list[HandlerClass]:
    handlers = [type(spec.handler) for spec in discover(True, (), ())]
    assert handlers, "no plugin is registered through the nexus.handlers entry points"
    return handlers


class Ticker(StreamingEventHandler):
    """Counts down, without declaring anything."""

    event_type = "demo:stream_ticks"
    stream_timeout = None

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"i": 1})


class Greeter(EventHandler):
    """Greets whoever is named."""

    event_type = "demo:greet"
    takes = EventSpec(
        "demo:greet:v2:requested",
        "Whom to greet.",
        {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        example={"name": "Ada"},
    )
    emits = (
        EventSpec(
            "demo:greet:v2:success",
            "The greeting.",
            {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
            example={"text": "hello Ada"},
        ),
        EventSpec("demo:greeting:v1:sent", "Someone was greeted.", {"type": "object"}, example={}),
    )

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"text": f"hello {event.payload['name']}"}


def resolve(node: Any, document: dict[str, Any]) -> Any:
    """``node`` with every local ``$ref`` (``#/...``) of ``document`` replaced by what it points to."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = document
            for part in ref[2:].split("/"):
                target = target[part]
            return resolve(target, document)
        return {key: resolve(value, document) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(item, document) for item in node]
    return node


def messages_of(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {mid: resolve(message, document) for mid, message in document["channels"]["ws"]["messages"].items()}


def operation_messages(document: dict[str, Any], operation: str) -> list[str]:
    """The names (event types, frame types) of an operation's messages."""
    resolved = resolve(document["operations"][operation], document)
    return [message["name"] for message in resolved["messages"]]


def states(names: list[str]) -> list[str]:
    return [name.rsplit(":", 1)[1] for name in names]


async def test_the_built_in_plugins_document_passes_the_asyncapi_parser(tmp_path: Path) -> None:
    """The document of the built-in plugins (what `nexus docs asyncapi` writes) parses with @asyncapi/parser with
    no diagnostic of severity error: the parser resolves every $ref and checks the document against the AsyncAPI
    3.0 schema and its rules."""
    node = node_with(PARSER)
    path = tmp_path / "asyncapi.json"
    path.write_text(render_asyncapi(built_in_handlers()))
    code, stdout, stderr = await run_script(node, "asyncapi.mjs", str(path))
    errors = [line for line in map(json.loads, stdout.splitlines()) if line["severity"] == 0]
    assert (code, errors) == (0, []), stderr
    assert "valid AsyncAPI 3.0.0" in stderr


async def test_the_parser_check_fails_a_broken_document(tmp_path: Path) -> None:
    """The same check exits 1 and reports an error for a document that breaks the AsyncAPI rules (an operation
    whose action is neither send nor receive), so a passing check means something."""
    node = node_with(PARSER)
    document = asyncapi_document([Greeter])
    document["operations"]["subscribe"]["action"] = "publish"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(document))
    code, stdout, _ = await run_script(node, "asyncapi.mjs", str(path))
    errors = [line for line in map(json.loads, stdout.splitlines()) if line["severity"] == 0]
    assert code == 1
    assert any(error["path"] == ["operations", "subscribe", "action"] for error in errors)


def every_example(document: dict[str, Any]) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    for mid, message in messages_of(document).items():
        for example in message["examples"]:
            yield mid, message["payload"], example["payload"]


def test_every_example_fits_its_message_schema() -> None:
    """Each message's example frame validates against the message's payload schema (the parser does not check
    examples), for the built-in plugins and for handlers that declare nothing."""
    document = asyncapi_document([*built_in_handlers(), Ticker, Greeter])
    checked = 0
    for mid, schema, example in every_example(document):
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(example))
        assert errors == [], f"{mid}: {[e.message for e in errors]}"
        checked += 1
    assert checked == len(document["channels"]["ws"]["messages"]) > 100


def test_a_wrong_example_is_caught_by_the_schema_check() -> None:
    """The example check above rejects a frame whose payload does not fit the handler's declared schema."""
    document = asyncapi_document([Greeter])
    message = resolve(document["components"]["messages"]["demo.greet.v2.requested"], document)
    assert list(jsonschema.Draft7Validator(message["payload"]).iter_errors(message["examples"][0]["payload"])) == []
    wrong = {**message["examples"][0]["payload"], "payload": {"name": 5}}
    assert list(jsonschema.Draft7Validator(message["payload"]).iter_errors(wrong)) != []


def test_a_streaming_handler_gets_its_whole_lifecycle_and_a_plain_one_its_terminal_events() -> None:
    """A streaming handler's lifecycle has started, stream, heartbeat and the four terminal events (timeout only
    when it has a timeout); a plain one's has only the terminal events; each request is a send replied to by
    `published`."""
    document = asyncapi_document([Ticker, Greeter])
    assert states(operation_messages(document, "demo.stream_ticks.v1.lifecycle")) == [
        "started",
        "stream",
        "heartbeat",
        "success",
        "failed",
        "cancelled",
    ]
    assert states(operation_messages(document, "demo.greet.v2.lifecycle")) == [
        "success",
        "failed",
        "timeout",
        "cancelled",
    ]
    request = document["operations"]["demo.greet.v2"]
    assert request["action"] == "send"
    assert operation_messages(document, "demo.greet.v2") == ["demo:greet:v2:requested"]
    reply = resolve(request["reply"], document)
    assert [m["name"] for m in reply["messages"]] == ["published"]
    assert document["operations"]["demo.greet.v2.lifecycle"]["action"] == "receive"


def test_declared_schemas_replace_the_generic_payloads() -> None:
    """The request, the success and the side events carry the payload schemas and examples the handler declares;
    an undeclared request or chunk is any object."""
    document = asyncapi_document([Ticker, Greeter])
    messages = messages_of(document)

    def payload_schema(mid: str) -> Any:
        return messages[mid]["payload"]["allOf"][1]["properties"]["payload"]

    assert payload_schema("demo.greet.v2.requested") == dict(Greeter.takes.schema)
    assert messages["demo.greet.v2.requested"]["examples"][0]["payload"]["payload"] == {"name": "Ada"}
    assert payload_schema("demo.greet.v2.success") == dict(Greeter.emits[0].schema)
    assert messages["demo.greet.v2.success"]["examples"][0]["payload"]["payload"] == {"text": "hello Ada"}
    assert document["operations"]["demo.greeting.v1.sent"]["action"] == "receive"
    assert messages["demo.greeting.v1.sent"]["description"] == "Someone was greeted."
    assert payload_schema("demo.stream_ticks.v1.requested") == {"type": "object"}
    assert payload_schema("demo.stream_ticks.v1.stream") == {"type": "object"}
    heartbeat = payload_schema("demo.stream_ticks.v1.heartbeat")
    assert heartbeat["required"] == ["stream_count", "elapsed_s"]
    assert messages["demo.stream_ticks.v1.heartbeat"]["examples"][0]["payload"]["offset"] == 0


def test_the_built_in_plugins_are_all_described() -> None:
    """Every built-in handler's request and every event it declares is a message of the document."""
    handlers = built_in_handlers()
    messages = {m["name"] for m in messages_of(asyncapi_document(handlers)).values()}
    declared = {spec.event_type for cls in handlers for spec in (cls.takes, *cls.emits) if spec is not None}
    assert declared <= messages
    assert len(declared) > 40


def test_the_protocol_frames_follow_the_gateway() -> None:
    """The control frames are described with the gateway's error table (every code, as an enum) and the
    request/reply pairs the protocol has."""
    document = asyncapi_document([])
    messages = messages_of(document)
    assert sorted(messages["error"]["payload"]["properties"]["code"]["enum"]) == sorted(ERRORS)
    replies = {
        name: [m["name"] for m in resolve(op["reply"], document)["messages"]]
        for name, op in document["operations"].items()
        if "reply" in op
    }
    assert replies == {
        "subscribe": ["subscribed"],
        "unsubscribe": ["unsubscribed"],
        "ping": ["pong"],
        "publish": ["published"],
    }
    assert document["channels"]["ws"]["address"] == "/ws"
    assert document["servers"]["gateway"]["protocol"] == "ws"
    assert asyncapi_document([], host="events.example.com:443", tls=True)["servers"]["gateway"] == {
        **document["servers"]["gateway"],
        "host": "events.example.com:443",
        "protocol": "wss",
    }


def test_message_ids_are_event_types_with_dots() -> None:
    """Message and operation ids are the event type's tokens joined by dots (AsyncAPI ids allow no `:`)."""
    assert message_id("messaging:send_message:v1:requested") == "messaging.send_message.v1.requested"
    document = json.loads(render_asyncapi([Greeter]))
    assert "demo.greet.v2.requested" in document["components"]["messages"]


def test_docs_asyncapi_check_reports_an_out_of_date_file(tmp_path: Path) -> None:
    """`nexus docs asyncapi -o FILE --check` exits 0 when FILE is current and 1, naming the command to run, when
    it is not."""
    path = tmp_path / "asyncapi.json"
    command = [sys.executable, "-m", "nexus.cli", "docs", "asyncapi", "--no-entry-points", "-o", str(path)]
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert path.read_text() == render_asyncapi([])
    assert subprocess.run([*command, "--check"], capture_output=True).returncode == 0
    path.write_text("{}\n")
    stale = subprocess.run([*command, "--check"], capture_output=True, text=True)
    assert stale.returncode == 1
    assert f"run 'nexus docs asyncapi -o {path}'" in stale.stderr


@pytest.mark.parametrize("topic", ["events", "asyncapi"])
def test_docs_takes_a_handler_flag(topic: str) -> None:
    """`nexus docs <topic> --handler module:Class` describes that handler."""
    command = [
        sys.executable,
        "-m",
        "nexus.cli",
        "docs",
        topic,
        "--no-entry-points",
        "--handler",
        "test_asyncapi:Greeter",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr
    assert "demo:greet:v2:requested" in result.stdout
