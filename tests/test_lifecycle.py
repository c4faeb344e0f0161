"""The lifecycle of one request as a pure state machine, driven with explicit times."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus import Event, StreamClosed, StreamErrorType, parse_time
from nexus.errors import InvalidEventType, InvalidState
from nexus.events import TERMINAL_STATES
from nexus.lifecycle import Lifecycle, State


def _request(event_type: str = "demo:stream_x:v1:requested", **metadata: str) -> Event:
    return Event.create(event_type, {"n": 3}, metadata=metadata or {"user_id": "u1", "traceparent": "00-abc"})


def _terminal_ops(lifecycle: Lifecycle, now: float) -> list[Callable[[], Event]]:
    return [
        lambda: lifecycle.succeed(now),
        lambda: lifecycle.fail(now, StreamErrorType.HANDLER_ERROR, "boom"),
        lambda: lifecycle.time_out(now, 1.0),
        lambda: lifecycle.cancel(now, "bye"),
    ]


def test_streaming_order_and_stats() -> None:
    """A stream produces started, its chunks in order, then success with the chunk count and duration."""
    request = _request()
    lifecycle = Lifecycle(request, streaming=True, now=100.0)
    events = [lifecycle.start(now=101.0)]
    events += [lifecycle.chunk({"i": i}) for i in range(3)]
    events.append(lifecycle.succeed(now=103.5))
    assert [event.event_type for event in events] == [
        "demo:stream_x:v1:started",
        "demo:stream_x:v1:stream",
        "demo:stream_x:v1:stream",
        "demo:stream_x:v1:stream",
        "demo:stream_x:v1:success",
    ]
    assert events[0].payload == {}
    assert [event.payload for event in events[1:4]] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert events[-1].payload == {"stream_count": 3, "duration_s": 2.5}
    assert lifecycle.state is State.SUCCESS
    assert lifecycle.terminal
    assert lifecycle.stream_count == 3
    assert lifecycle.duration(now=500.0) == 2.5


def test_long_stream_counts_every_chunk() -> None:
    """A stream of 100 chunks reports 100 in heartbeats and in success."""
    lifecycle = Lifecycle(_request(), streaming=True, now=0.0)
    lifecycle.start(now=0.0)
    chunks = [lifecycle.chunk({"i": i}) for i in range(100)]
    assert [chunk.payload["i"] for chunk in chunks] == list(range(100))
    assert lifecycle.heartbeat(now=1.0).payload["stream_count"] == 100
    assert lifecycle.succeed(now=2.0).payload == {"stream_count": 100, "duration_s": 2.0}


def test_heartbeat_payload() -> None:
    """A heartbeat reports the chunks sent so far and the seconds since the stream started."""
    lifecycle = Lifecycle(_request(), streaming=True, now=0.0)
    lifecycle.start(now=10.0)
    first = lifecycle.heartbeat(now=11.0)
    lifecycle.chunk({"a": 1})
    lifecycle.chunk({"a": 2})
    second = lifecycle.heartbeat(now=12.25)
    assert first.event_type == "demo:stream_x:v1:heartbeat"
    assert first.payload == {"stream_count": 0, "elapsed_s": 1.0}
    assert second.payload == {"stream_count": 2, "elapsed_s": 2.25}
    assert lifecycle.state is State.STARTED


@pytest.mark.parametrize(
    ("finish", "state", "payload"),
    [
        (
            lambda lc: lc.fail(7.0, StreamErrorType.HANDLER_ERROR, "ValueError: bad"),
            "failed",
            {"error": {"type": "handler_error", "message": "ValueError: bad"}, "stream_count": 1, "duration_s": 2.0},
        ),
        (
            lambda lc: lc.time_out(8.0, 3.0),
            "timeout",
            {"stream_count": 1, "duration_s": 3.0, "timeout_s": 3.0},
        ),
        (
            lambda lc: lc.cancel(6.5, "cancelled by requester"),
            "cancelled",
            {"stream_count": 1, "duration_s": 1.5, "reason": "cancelled by requester"},
        ),
    ],
)
def test_other_terminal_payloads(finish: Callable[[Lifecycle], Event], state: str, payload: dict[str, object]) -> None:
    """failed, timeout and cancelled carry the error, the timeout or the reason, with the stream's statistics."""
    lifecycle = Lifecycle(_request(), streaming=True, now=0.0)
    lifecycle.start(now=5.0)
    lifecycle.chunk({"x": 1})
    event = finish(lifecycle)
    assert event.event_type == f"demo:stream_x:v1:{state}"
    assert event.payload == payload
    assert lifecycle.state.value == state


def test_lifecycle_event_ids_and_metadata() -> None:
    """Every lifecycle event has a fresh id, the time it was made, the request's metadata, and correlation_id =
    the request's id."""
    request = _request(user_id="u1", traceparent="00-abc", correlation_id="client-chosen")
    original_metadata = dict(request.metadata)
    lifecycle = Lifecycle(request, streaming=True, now=0.0)
    before = time.time()
    events = [
        lifecycle.start(now=0.0),
        lifecycle.chunk({"i": 0}),
        lifecycle.heartbeat(now=0.5),
        lifecycle.chunk({"i": 1}),
        lifecycle.cancel(now=1.0, reason="r"),
    ]
    ids = [event.event_id for event in events]
    assert len(set(ids)) == len(ids)
    assert request.event_id not in ids
    for event in events:
        assert event.metadata == {"user_id": "u1", "traceparent": "00-abc", "correlation_id": request.event_id}
        assert event.correlation_id == request.event_id
        assert event.offset == 0
        assert before - 1 <= parse_time(event.timestamp) <= time.time() + 1
    assert request.metadata == original_metadata
    assert lifecycle.correlation_id == request.event_id


def test_plain_lifecycle() -> None:
    """A plain request has no started, chunk or heartbeat; success carries the handler's result."""
    lifecycle = Lifecycle(_request("demo:echo:v1:requested"), streaming=False, now=1.0)
    with pytest.raises(InvalidState, match=r"^a plain handler's request has no 'started' event$"):
        lifecycle.start(now=1.0)
    with pytest.raises(InvalidState):
        lifecycle.chunk({"a": 1})
    with pytest.raises(InvalidState):
        lifecycle.heartbeat(now=1.5)
    assert lifecycle.state is State.REQUESTED
    event = lifecycle.succeed(now=3.0, result={"echo": {"n": 3}})
    assert event.event_type == "demo:echo:v1:success"
    assert event.payload == {"echo": {"n": 3}}
    assert lifecycle.duration(now=9.0) == 2.0


def test_a_duration_is_given_to_the_microsecond() -> None:
    """A request's duration (a stream's terminal events carry it as ``duration_s``) is rounded to microseconds and
    stops at its end."""
    lifecycle = Lifecycle(_request("demo:echo:v1:requested"), streaming=False, now=10.0)
    lifecycle.succeed(now=10.12345678)
    assert lifecycle.duration(now=99.0) == 0.123457


def test_plain_success_without_result_is_empty() -> None:
    """A plain handler that returns nothing succeeds with an empty payload."""
    lifecycle = Lifecycle(_request("demo:echo:v1:requested"), streaming=False, now=0.0)
    assert lifecycle.succeed(now=0.0).payload == {}


def test_plain_failure_has_no_stream_stats() -> None:
    """A plain request's failed event carries only the error."""
    lifecycle = Lifecycle(_request("demo:echo:v1:requested"), streaming=False, now=0.0)
    event = lifecycle.fail(now=1.0, error_type=StreamErrorType.NO_HANDLER, message="none")
    assert event.payload == {"error": {"type": "no_handler", "message": "none"}}


def test_chunk_before_start_is_refused() -> None:
    """A stream cannot send a chunk or heartbeat before it started, nor start twice."""
    lifecycle = Lifecycle(_request(), streaming=True, now=0.0)
    with pytest.raises(InvalidState, match=r"^a chunk needs a started stream$"):
        lifecycle.chunk({"a": 1})
    with pytest.raises(InvalidState, match=r"^a heartbeat needs a started stream$"):
        lifecycle.heartbeat(now=0.0)
    lifecycle.start(now=0.0)
    with pytest.raises(InvalidState, match="already started"):
        lifecycle.start(now=1.0)
    assert lifecycle.stream_count == 0


@pytest.mark.parametrize("first", range(4))
@pytest.mark.parametrize("then", range(4))
def test_no_terminal_after_terminal(first: int, then: int) -> None:
    """After any terminal event every other terminal event is refused, so success can never follow failure."""
    lifecycle = Lifecycle(_request(), streaming=True, now=0.0)
    lifecycle.start(now=0.0)
    _terminal_ops(lifecycle, 1.0)[first]()
    state = lifecycle.state
    with pytest.raises(StreamClosed, match=f"already ended with {state.value}"):
        _terminal_ops(lifecycle, 2.0)[then]()
    assert lifecycle.state is state


@pytest.mark.parametrize("first", range(4))
def test_nothing_after_terminal(first: int) -> None:
    """After the terminal event, start, chunk and heartbeat all raise StreamClosed."""
    lifecycle = Lifecycle(_request(), streaming=True, now=0.0)
    lifecycle.start(now=0.0)
    lifecycle.chunk({"a": 1})
    _terminal_ops(lifecycle, 1.0)[first]()
    with pytest.raises(StreamClosed, match=r"^cannot send a chunk: the stream .* already ended with "):
        lifecycle.chunk({"a": 2})
    with pytest.raises(StreamClosed, match=r"^cannot send a heartbeat: "):
        lifecycle.heartbeat(now=2.0)
    with pytest.raises(StreamClosed, match=r"^cannot start: "):
        lifecycle.start(now=2.0)
    assert lifecycle.stream_count == 1
    assert lifecycle.duration(now=99.0) == 1.0


def test_unstarted_stream_can_be_cancelled() -> None:
    """A stream still waiting its turn can end with cancelled, measured from the request."""
    lifecycle = Lifecycle(_request(), streaming=True, now=10.0)
    event = lifecycle.cancel(now=10.5, reason="server_shutdown")
    assert event.payload == {"stream_count": 0, "duration_s": 0.5, "reason": "server_shutdown"}


def test_non_requested_event_cannot_start_a_lifecycle() -> None:
    """Only a ``requested`` event opens a lifecycle; other states and bad types are refused."""
    for state in ("started", "stream", "success", "heartbeat", "created"):
        with pytest.raises(InvalidState, match="requested"):
            Lifecycle(Event.create(f"demo:stream_x:v1:{state}"), streaming=True, now=0.0)
    with pytest.raises(InvalidEventType):
        Lifecycle(Event(event_type="not-a-type"), streaming=False, now=0.0)


def test_stats() -> None:
    """``stats`` reports the correlation id, request type, state, chunk count and duration."""
    request = _request()
    lifecycle = Lifecycle(request, streaming=True, now=0.0)
    lifecycle.start(now=1.0)
    lifecycle.chunk({})
    assert lifecycle.stats(now=4.0) == {
        "correlation_id": request.event_id,
        "event_type": "demo:stream_x:v1:requested",
        "state": "started",
        "stream_count": 1,
        "duration_s": 3.0,
    }


def test_negative_clock_gap_is_zero_duration() -> None:
    """A clock reading earlier than the start gives a duration of zero, never a negative one."""
    lifecycle = Lifecycle(_request(), streaming=True, now=5.0)
    lifecycle.start(now=5.0)
    assert lifecycle.succeed(now=4.0).payload["duration_s"] == 0.0


# --- property: random operation sequences ---------------------------------------------------------------------

OPERATIONS = ("start", "chunk", "heartbeat", "succeed", "fail", "time_out", "cancel")
# Chunks are drawn more often than terminal operations, so that long streams are common.
WEIGHTED_OPERATIONS = (*OPERATIONS, "chunk", "chunk", "chunk", "chunk", "heartbeat")


def _apply(lifecycle: Lifecycle, operation: str, now: float, chunk_number: int) -> Event:
    if operation == "start":
        return lifecycle.start(now)
    if operation == "chunk":
        return lifecycle.chunk({"n": chunk_number})
    if operation == "heartbeat":
        return lifecycle.heartbeat(now)
    if operation == "succeed":
        return lifecycle.succeed(now)
    if operation == "fail":
        return lifecycle.fail(now, StreamErrorType.HANDLER_ERROR, "x")
    if operation == "time_out":
        return lifecycle.time_out(now, 1.0)
    return lifecycle.cancel(now, "r")


@settings(max_examples=300, deadline=None)
@given(
    streaming=st.booleans(),
    begin_with_start=st.booleans(),
    runs=st.lists(st.tuples(st.sampled_from(WEIGHTED_OPERATIONS), st.integers(1, 12)), max_size=12),
    steps=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=10),
)
def test_random_operation_sequences(
    streaming: bool, begin_with_start: bool, runs: list[tuple[str, int]], steps: list[float]
) -> None:
    """Whatever operations are tried, at most one terminal event is produced, nothing follows it, and the chunk
    count equals the chunks accepted."""
    request = _request()
    lifecycle = Lifecycle(request, streaming=streaming, now=0.0)
    produced: list[Event] = []
    accepted_chunks = 0
    now = 0.0
    operations = ["start"] * begin_with_start + [operation for operation, repeat in runs for _ in range(repeat)]
    for index, operation in enumerate(operations):
        now += steps[index % len(steps)]
        was_terminal = lifecycle.terminal
        try:
            event = _apply(lifecycle, operation, now, accepted_chunks)
        except InvalidState as exc:
            error: InvalidState | None = exc
        else:
            error = None
        if error is not None:
            assert not was_terminal or isinstance(error, StreamClosed)
            continue
        assert not was_terminal, f"{operation} produced an event after the terminal one"
        produced.append(event)
        if operation == "chunk":
            accepted_chunks += 1
        assert event.correlation_id == request.event_id

    states = [event.state for event in produced]
    terminal_positions = [i for i, state in enumerate(states) if state in TERMINAL_STATES]
    assert len(terminal_positions) <= 1
    if terminal_positions:
        assert terminal_positions[0] == len(states) - 1
        assert lifecycle.terminal
        assert lifecycle.state.value == states[-1]
    else:
        assert not lifecycle.terminal
    assert states.count("stream") == accepted_chunks == lifecycle.stream_count
    if not streaming:
        assert set(states) <= TERMINAL_STATES
    elif "stream" in states or "heartbeat" in states:
        assert states[0] == "started"
    assert states.count("started") <= 1
    assert len({event.event_id for event in produced}) == len(produced)
    if "success" in states and streaming:
        assert produced[-1].payload["stream_count"] == accepted_chunks
