"""The analytics plugin end to end: window definitions, metric values, closed windows, alerts, live bus metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats_support import delete_stream, nats_settings, shared_nats_url, unique_names
from nexus.handlers.analytics.plugin import DefineWindow, RecordMetric, Snapshot, StreamMetrics

from nexus import Event, parse_time
from nexus.plugins import HandlerSpec, discover
from nexus.testing import TestServer, run_server

GUARD = 10.0
DEFINE = "analytics:define_window:v1:requested"
RECORD = "analytics:record_metric:v1:requested"
CLOSED = "analytics:window:v1:closed"
CROSSED = "analytics:threshold:v1:crossed"
SNAPSHOT = "analytics:snapshot:v1:requested"
SILENT = "analytics:source:v1:silent"
RESUMED = "analytics:source:v1:resumed"
T0 = 1736150400  # 2025-01-06T08:00:00Z


def analytics_handlers() -> list[HandlerSpec]:
    """Fresh instances of the four handlers, named as their entry points."""
    return [
        HandlerSpec("analytics.define_window", DefineWindow(), "test"),
        HandlerSpec("analytics.record_metric", RecordMetric(), "test"),
        HandlerSpec("analytics.snapshot", Snapshot(), "test"),
        HandlerSpec("analytics.stream_metrics", StreamMetrics(), "test"),
    ]


async def call(nexus: TestServer, event_type: str, payload: dict[str, Any]) -> Event:
    return await asyncio.wait_for(nexus.client.call(event_type, payload), GUARD)


async def record(nexus: TestServer, metric: str, value: float, at: float | str) -> Event:
    done = await call(nexus, RECORD, {"metric": metric, "value": value, "timestamp": at})
    assert done.state == "success", done.payload
    return done


PARKING = {
    "name": "free_1m",
    "metric": "parking.free",
    "kind": "tumbling",
    "size_s": 60,
    "agg": "mean",
    "grace_s": 10,
    "thresholds": {"low": 40, "critical": 20},
}


async def test_window_closes_at_the_watermark_and_alerts_only_on_crossings() -> None:
    """Per-minute means 50, 35, 30, 15, 45 close five windows and raise exactly four alerts (two down, two up)."""
    async with run_server(*analytics_handlers()) as nexus:
        defined = await call(nexus, DEFINE, PARKING)
        assert defined.state == "success"
        assert defined.payload == {**PARKING, "tags": {}, "silence_s": 0, "replaced": False}
        events = await nexus.record(CLOSED, CROSSED)
        # two values per minute (means: 50, 35, 30, 15, 45), then one at minute 6 + 10 s to close minute 4
        for minute, (a, b) in enumerate([(40, 60), (30, 40), (20, 40), (10, 20), (40, 50)]):
            await record(nexus, "parking.free", a, T0 + minute * 60 + 5)
            await record(nexus, "parking.free", b, T0 + minute * 60 + 50)
        # each minute closed when the watermark (greatest time - 10 s) passed its end; the last value, at
        # 4:50, left the watermark at 4:40, so minute 4 is still open
        await events.wait_for(lambda evs: sum(e.event_type == CLOSED for e in evs) == 4)
        last = await record(nexus, "parking.free", 45, T0 + 6 * 60 + 10)  # watermark 6:00 closes minute 4
        assert last.payload["closed"] == 1
        assert last.payload["alerts"] == 2  # 45 recovers from critical and from low
        await events.wait_for(lambda evs: sum(e.event_type == CLOSED for e in evs) == 5)
        closed = [e.payload for e in events.events if e.event_type == CLOSED]
        assert [(c["value"], c["count"]) for c in closed] == [(50, 2), (35, 2), (30, 2), (15, 2), (45, 2)]
        assert [parse_time(c["start"]) - T0 for c in closed] == [0, 60, 120, 180, 240]
        assert [parse_time(c["end"]) - T0 for c in closed] == [60, 120, 180, 240, 300]
        assert closed[0] == {
            "name": "free_1m",
            "metric": "parking.free",
            "kind": "tumbling",
            "agg": "mean",
            "start": "2025-01-06T08:00:00Z",
            "end": "2025-01-06T08:01:00Z",
            "value": 50,
            "count": 2,
            "late": 0,
            "early": False,
        }
        await events.wait_for(lambda evs: sum(e.event_type == CROSSED for e in evs) == 4)
        alerts = [e.payload for e in events.events if e.event_type == CROSSED]
        assert [(a["level"], a["direction"], a["state"], a["value"], a["threshold"]) for a in alerts] == [
            ("low", "down", "breached", 35, 40),
            ("critical", "down", "breached", 15, 20),
            ("critical", "up", "recovered", 45, 20),
            ("low", "up", "recovered", 45, 40),
        ]
        assert all(a["name"] == "free_1m" for a in alerts)
        await events.stop()


async def test_late_value_is_counted_and_reported_not_mixed_in() -> None:
    """A value for a closed window is reported late in the reply and in the next closed window, not aggregated."""
    async with run_server(*analytics_handlers()) as nexus:
        await call(nexus, DEFINE, {**PARKING, "agg": "sum", "thresholds": {}})
        events = await nexus.record(CLOSED)
        await record(nexus, "parking.free", 1, T0 + 30)
        await record(nexus, "parking.free", 2, T0 + 75)  # watermark 65 closes minute 0
        late = await record(nexus, "parking.free", 1000, "2025-01-06T08:00:59Z")
        assert late.payload["late"] == ["free_1m"]
        assert late.payload["windows"] == []
        within_grace = await record(nexus, "parking.free", 4, T0 + 70)  # behind 75 but its window is open
        assert (within_grace.payload["windows"], within_grace.payload["late"]) == (["free_1m"], [])
        await record(nexus, "parking.free", 0, T0 + 130)  # closes minute 1
        await events.wait_count(2)
        assert [(e.payload["value"], e.payload["late"]) for e in events.events] == [(1, 0), (6, 1)]
        await events.stop()


async def test_session_window_closes_when_no_further_value_arrives() -> None:
    """A session whose metric falls silent is closed by the plugin's timer and published, with no other value."""
    async with run_server(*analytics_handlers(), handler_config={"analytics": {"session_check_s": 0.02}}) as nexus:
        await call(nexus, DEFINE, {"name": "visit", "metric": "door", "kind": "session", "gap_s": 0.3, "agg": "count"})
        events = await nexus.record(CLOSED)
        await call(nexus, RECORD, {"metric": "door", "value": 1})
        await call(nexus, RECORD, {"metric": "door", "value": 1})
        [closed] = await events.wait_count(1)
        assert (closed.payload["name"], closed.payload["count"], closed.payload["value"]) == ("visit", 2, 2)
        assert parse_time(closed.payload["end"]) - parse_time(closed.payload["start"]) >= 0.3
        await events.stop()


async def test_sliding_and_tag_filtered_definitions() -> None:
    """A sliding p95 over tagged values closes each overlapping window with its own percentile."""
    async with run_server(*analytics_handlers()) as nexus:
        definition = {
            "name": "north_p95",
            "metric": "latency",
            "kind": "sliding",
            "size_s": 20,
            "slide_s": 10,
            "agg": "p95",
            "tags": {"zone": "north"},
        }
        assert (await call(nexus, DEFINE, definition)).state == "success"
        events = await nexus.record(CLOSED)
        for i in range(1, 11):  # values 1..10 at T0+1..T0+10 s; [T0, T0+10) holds 1..9, [T0-10, T0+10) too
            await call(nexus, RECORD, {"metric": "latency", "value": i, "timestamp": T0 + i, "tags": {"zone": "north"}})
        skipped = await call(nexus, RECORD, {"metric": "latency", "value": 999, "timestamp": T0 + 5, "tags": {}})
        assert skipped.payload["windows"] == []
        await call(nexus, RECORD, {"metric": "latency", "value": 0, "timestamp": T0 + 40, "tags": {"zone": "north"}})
        await events.wait_count(3)
        windows = [(parse_time(e.payload["start"]) - T0, e.payload["count"], e.payload["value"]) for e in events.events]
        # [T0-10, T0+10): 1..9 -> rank 8 * .95 = 7.6 -> 8 + .6 = 8.6; [T0, T0+20): 1..10 -> 9.55;
        # [T0+10, T0+30): just 10
        assert windows == [(-10, 9, pytest.approx(8.6)), (0, 10, pytest.approx(9.55)), (10, 1, 10)]
        await events.stop()


async def test_stream_metrics_streams_the_bus_statistics_every_interval() -> None:
    """stream_metrics sends events/s by service, active streams, subscribers and latency percentiles, repeatedly."""
    async with run_server(*analytics_handlers()) as nexus:
        for i in range(5):
            await call(nexus, RECORD, {"metric": "m", "value": i})
        stream = nexus.client.request("analytics:stream_metrics:v1:requested", {"interval_s": 0.1}, heartbeats=False)
        chunks: list[dict[str, Any]] = []

        async def take_two() -> None:
            async for event in stream:
                if event.state == "stream":
                    chunks.append(event.payload)
                    if len(chunks) == 2:
                        await stream.cancel()

        await asyncio.wait_for(take_two(), GUARD)
        assert stream.terminal is not None
        assert stream.terminal.state == "cancelled"
        first = chunks[0]
        assert first["events_per_s_by_service"]["analytics"] > 0
        assert first["active_streams"] == 1  # this one
        assert first["subscribers"] >= 1
        assert set(first["delivery_latency_ms"]) >= {"p50", "p95", "p99"}
        assert parse_time(chunks[1]["at"]) >= parse_time(first["at"])
        assert StreamMetrics.emits[0].example_errors() == []
        for chunk in chunks:
            StreamMetrics.emits[0].validate(chunk)


@pytest.mark.parametrize(
    ("event_type", "payload", "message"),
    [
        (DEFINE, {**PARKING, "kind": "hourly"}, "payload.kind: 'hourly' is not one of"),
        (DEFINE, {**PARKING, "kind": "sliding"}, "slide_s is required"),
        (DEFINE, {**PARKING, "kind": "session"}, "gap_s is required"),
        (DEFINE, {**PARKING, "thresholds": {"low": 10, "critical": 30}}, "must not be above thresholds.low"),
        (DEFINE, {**PARKING, "size_s": -5}, "payload.size_s: -5 is less than or equal to the minimum of 0"),
        (DEFINE, {"metric": "m", "kind": "tumbling", "size_s": 1, "agg": "sum"}, "'name' is a required property"),
        (RECORD, {"metric": "parking.free", "value": "full"}, "payload.value: 'full' is not of type 'number'"),
        (RECORD, {"metric": "parking.free"}, "'value' is a required property"),
        (RECORD, {"metric": "parking.free", "value": 1, "timestamp": "soon"}, "'soon' is not RFC 3339 text"),
        (RECORD, {"metric": "parking.free", "value": 1, "timestamp": 4e9}, "ahead of this node's clock"),
        (RECORD, {"metric": "parking.free", "value": 1, "tags": {"a": [1]}}, "payload.tags.a: [1] is not of type"),
        ("analytics:stream_metrics:v1:requested", {"interval_s": 0.001}, "outside 0.1 to 3600"),
        ("analytics:stream_metrics:v1:requested", {"interval_s": "fast"}, "is not of type 'number'"),
        (DEFINE, {**PARKING, "thresholds": [{"name": "hot"}]}, "payload.thresholds"),
        (DEFINE, {**PARKING, "thresholds": [{"name": "a", "above": 1}, {"name": "a", "below": 0}]}, "unique"),
        (DEFINE, {**PARKING, "silence_s": -1}, "payload.silence_s: -1 is less than the minimum of 0"),
        (SNAPSHOT, {"limit": 5000}, "payload.limit: 5000 is more than 1000"),
        (SNAPSHOT, {"metric": ""}, "payload.metric: '' should be non-empty"),
    ],
)
async def test_bad_payloads_fail_clearly_and_keep_the_windows(
    event_type: str, payload: dict[str, Any], message: str
) -> None:
    """A bad request ends with failed/invalid_payload naming the problem; the defined window keeps its state."""
    async with run_server(*analytics_handlers()) as nexus:
        await call(nexus, DEFINE, {**PARKING, "agg": "count", "thresholds": {}})
        await record(nexus, "parking.free", 1, T0 + 1)
        bad = await call(nexus, event_type, payload)
        assert bad.state == "failed"
        assert bad.payload["error"]["type"] == "invalid_payload"
        assert message in bad.payload["error"]["message"]
        events = await nexus.record(CLOSED)
        await record(nexus, "parking.free", 1, T0 + 2)
        await record(nexus, "parking.free", 1, T0 + 75)
        [closed] = await events.wait_count(1)
        assert (closed.payload["name"], closed.payload["count"]) == ("free_1m", 2)
        await events.stop()


async def test_windows_from_the_config_are_defined_at_start_up() -> None:
    """Definitions listed under windows in the plugin's config exist as soon as the server runs."""
    settings = {"analytics": {"windows": [{**PARKING, "agg": "max"}], "default_grace_s": 0}}
    async with run_server(*analytics_handlers(), handler_config=settings) as nexus:
        events = await nexus.record(CLOSED)
        assert (await record(nexus, "parking.free", 7, T0)).payload["windows"] == ["free_1m"]
        await record(nexus, "parking.free", 3, T0 + 71)
        [closed] = await events.wait_count(1)
        assert closed.payload["value"] == 7
        await events.stop()


async def test_a_bad_window_in_the_config_stops_the_server_at_start_up() -> None:
    """A definition in the config that does not fit is refused at start-up, naming its index and field."""
    settings = {"analytics": {"windows": [PARKING, {**PARKING, "kind": "sliding"}]}}
    with pytest.raises(ValueError, match=r"windows\[1\]: slide_s is required"):
        async with run_server(*analytics_handlers(), handler_config=settings):
            pass


async def test_entry_point_handlers_share_one_engine_per_node(tmp_path: Any) -> None:
    """Loaded through the entry points, define_window and record_metric share windows; another server (with its
    own data directory) does not."""
    specs = [s for s in discover(True, (), ()) if s.name.startswith("analytics.")]
    assert sorted(s.name for s in specs) == [s.name for s in analytics_handlers()]
    other_data = str(tmp_path / "other")
    async with run_server(*specs) as nexus, run_server(*analytics_handlers(), data_dir=other_data) as other:
        await call(nexus, DEFINE, PARKING)
        assert (await record(nexus, "parking.free", 50, T0)).payload["windows"] == ["free_1m"]
        assert (await record(other, "parking.free", 50, T0)).payload["windows"] == []


async def test_windows_defined_at_run_time_are_defined_again_after_a_restart(tmp_path: Any) -> None:
    """define_window keeps each definition (the data directory's store): a restarted server records into it at
    once; the config file wins over a kept definition of the same name; another data directory knew none."""
    data = str(tmp_path / "data")
    async with run_server(*analytics_handlers(), data_dir=data) as nexus:
        await call(nexus, DEFINE, PARKING)
        await call(nexus, DEFINE, {**PARKING, "name": "free_5m", "size_s": 300})
    async with run_server(*analytics_handlers(), data_dir=data) as restarted:
        windows = (await record(restarted, "parking.free", 50, T0)).payload["windows"]
        assert sorted(windows) == ["free_1m", "free_5m"]
    config = {"analytics": {"windows": [{**PARKING, "metric": "parking.taken"}]}}
    async with run_server(*analytics_handlers(), data_dir=data, handler_config=config) as configured:
        assert (await record(configured, "parking.free", 50, T0)).payload["windows"] == ["free_5m"]
        assert (await record(configured, "parking.taken", 5, T0)).payload["windows"] == ["free_1m"]
    async with run_server(*analytics_handlers(), data_dir=str(tmp_path / "other")) as elsewhere:
        assert (await record(elsewhere, "parking.free", 50, T0)).payload["windows"] == []


async def test_named_thresholds_alert_with_their_names_and_clear_past_the_hysteresis() -> None:
    """high_temp above 30 (hysteresis 2): means 31, 29, 27 breach once and clear once, each alert named."""
    definition = {
        "name": "boiler_1m",
        "metric": "boiler.temp",
        "kind": "tumbling",
        "size_s": 60,
        "agg": "mean",
        "thresholds": [{"name": "high_temp", "above": 30, "hysteresis": 2}, {"name": "frozen", "below": 0}],
    }
    async with run_server(*analytics_handlers()) as nexus:
        defined = await call(nexus, DEFINE, definition)
        assert defined.payload["thresholds"] == definition["thresholds"]
        events = await nexus.record(CROSSED)
        for minute, value in enumerate([31, 29, 27, 20]):  # the last one only closes the minute before it
            await record(nexus, "boiler.temp", value, T0 + minute * 60)
        alerts = [e.payload for e in await events.wait_count(2)]
        assert [(a["level"], a["bound"], a["state"], a["value"], a["threshold"], a["hysteresis"]) for a in alerts] == [
            ("high_temp", "above", "breached", 31, 30, 2),
            ("high_temp", "above", "recovered", 27, 30, 2),
        ]
        for alert in alerts:
            RecordMetric.emits[2].validate(alert)
        await events.stop()


async def test_snapshot_answers_the_open_windows_with_their_values_so_far() -> None:
    """A snapshot lists each open window's aggregate so far; a metric selects; the limit cuts and says so."""
    async with run_server(*analytics_handlers(), handler_config={"analytics": {"max_snapshot_windows": 2}}) as nexus:
        await call(nexus, DEFINE, PARKING)
        await call(nexus, DEFINE, {**PARKING, "name": "free_max", "agg": "max"})
        await call(nexus, DEFINE, {"name": "door", "metric": "door", "kind": "session", "gap_s": 600, "agg": "count"})
        for value, at in [(30, T0 + 5), (50, T0 + 20), (10, T0 + 65)]:  # watermark T0 + 55: minute 0 open
            await record(nexus, "parking.free", value, at)
        await record(nexus, "door", 1, T0 + 3)
        everything = await call(nexus, SNAPSHOT, {"limit": 2})
        assert everything.state == "success", everything.payload
        Snapshot.emits[0].validate(everything.payload)
        assert (everything.payload["total"], everything.payload["truncated"]) == (5, True)
        assert [w["name"] for w in everything.payload["windows"]] == ["door", "free_1m"]
        parking = await call(nexus, SNAPSHOT, {"metric": "parking.free", "limit": 2})
        assert [(w["name"], w["start"], w["value"], w["count"]) for w in parking.payload["windows"]] == [
            ("free_1m", "2025-01-06T08:00:00Z", 40, 2),
            ("free_1m", "2025-01-06T08:01:00Z", 10, 1),
        ]
        one = await call(nexus, SNAPSHOT, {"name": "free_max"})
        assert [(w["start"], w["value"]) for w in one.payload["windows"]] == [
            ("2025-01-06T08:00:00Z", 50),
            ("2025-01-06T08:01:00Z", 10),
        ]
        assert (one.payload["total"], one.payload["truncated"], one.payload["definitions"]) == (2, False, 1)


async def test_a_silent_source_is_published_once_and_its_return() -> None:
    """silence_s 0.2: after one value, one silent event; the next value publishes resumed."""
    config = {"analytics": {"session_check_s": 0.02}}
    async with run_server(*analytics_handlers(), handler_config=config) as nexus:
        await call(nexus, DEFINE, {**PARKING, "thresholds": {}, "silence_s": 0.2})
        events = await nexus.record(SILENT, RESUMED)
        await call(nexus, RECORD, {"metric": "parking.free", "value": 1, "timestamp": T0})
        [silent] = await events.wait_count(1)
        assert silent.event_type == SILENT
        assert silent.payload["name"] == "free_1m"
        assert silent.payload["last_value_at"] == "2025-01-06T08:00:00Z"
        assert silent.payload["silent_for_s"] >= 0.2
        await call(nexus, RECORD, {"metric": "parking.free", "value": 1, "timestamp": T0 + 30})
        resumed = (await events.wait_for(lambda evs: any(e.event_type == RESUMED for e in evs)))[-1]
        assert [e.event_type for e in events.events] == [SILENT, RESUMED]
        assert resumed.payload["value_at"] == "2025-01-06T08:00:30Z"
        assert resumed.payload["silent_for_s"] >= silent.payload["silent_for_s"]
        for event in events.events:
            spec = next(s for s in RecordMetric.emits if s.event_type == event.event_type)
            spec.validate(event.payload)
        await events.stop()


async def test_on_nats_a_node_that_starts_defines_the_windows_any_node_defined_at_run_time() -> None:
    """On the NATS bus definitions are kept in the deployment's bucket: with two nodes running, a window is
    defined (on either); both stop, and a node started again records into it at once."""
    url = shared_nats_url()
    stream, prefix = unique_names("anwin")
    settings = nats_settings(url, stream, prefix)
    try:
        async with (
            run_server(*analytics_handlers(), settings=settings) as one,
            run_server(*analytics_handlers(), settings=settings),
        ):
            assert (await call(one, DEFINE, PARKING)).event_type == "analytics:define_window:v1:success"
        async with run_server(*analytics_handlers(), settings=settings) as again:
            assert (await record(again, "parking.free", 50, T0)).payload["windows"] == ["free_1m"]
    finally:
        await delete_stream(url, f"KV_{stream}_KV")
        await delete_stream(url, stream)
