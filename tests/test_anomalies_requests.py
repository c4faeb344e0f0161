"""The anomalies plugin's baseline requests end to end: finite thresholds and minimum sizes, CSV baselines,
batches of points, the latest points and reset."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import numpy as np
import pytest
from nats_support import delete_stream, nats_settings, shared_nats_url, unique_names
from nexus.handlers.anomalies.baseline import Baseline, finite_threshold, threshold
from nexus.handlers.anomalies.plugin import Latest, Monitor, Reset, SetBaseline, StreamHealth

from nexus import Event
from nexus.plugins import HandlerSpec
from nexus.testing import StreamFollower, TestServer, run_server

GUARD = 10.0
RNG_POINTS = np.random.default_rng(11).normal(size=(14, 3)) * [1.0, 5.0, 0.2] + [10.0, -3.0, 0.5]
POINTS = RNG_POINTS.tolist()  # 3-D, 14 points: d + 11


async def call(nexus: TestServer, action: str, payload: dict[str, Any]) -> Event:
    return await asyncio.wait_for(nexus.client.call(f"anomalies:{action}:v1:requested", payload), GUARD)


def handlers() -> list[HandlerSpec]:
    made = {"set_baseline": SetBaseline(), "monitor": Monitor(), "stream_health": StreamHealth()}
    made |= {"latest": Latest(), "reset": Reset()}
    return [HandlerSpec(f"anomalies.{name}", handler, "--handler") for name, handler in made.items()]


def serve(**config: Any) -> Any:
    return run_server(*handlers(), handler_config={"anomalies": config})


def error(event: Event) -> str:
    assert event.state == "failed", event.payload
    assert event.payload["error"]["type"] == "invalid_payload"
    return str(event.payload["error"]["message"])


async def test_set_baseline_uses_the_finite_threshold_and_refuses_too_few_points() -> None:
    """By default the threshold is the finite-sample one for (d, n); asymptotic on request; d + 2 points fail."""
    async with serve() as nexus:
        done = await call(nexus, "set_baseline", {"baseline_id": "m", "points": POINTS})
        assert done.payload["threshold_method"] == "finite"
        assert done.payload["threshold"] == pytest.approx(finite_threshold(3, 14, 0.99), rel=1e-12)
        assert done.payload["threshold"] > threshold(3, 0.99) + 0.5
        chi2 = await call(nexus, "set_baseline", {"baseline_id": "c", "points": POINTS, "threshold": "asymptotic"})
        assert chi2.payload["threshold"] == pytest.approx(threshold(3, 0.99), rel=1e-12)
        # A point between the two thresholds: an anomaly only for the asymptotic baseline.
        fitted = Baseline.fit("m", POINTS)
        direction = np.linalg.cholesky(fitted.covariance) @ np.array([1.0, 0.0, 0.0])
        midway = (threshold(3, 0.99) + finite_threshold(3, 14, 0.99)) / 2
        point = (fitted.mean + midway * direction).tolist()
        finite = await call(nexus, "monitor", {"baseline_id": "m", "point": point})
        asymptotic = await call(nexus, "monitor", {"baseline_id": "c", "point": point})
        assert finite.payload["distance"] == pytest.approx(midway, rel=1e-9)
        assert (finite.payload["is_anomaly"], asymptotic.payload["is_anomaly"]) == (False, True)
        few = await call(nexus, "set_baseline", {"baseline_id": "f", "points": POINTS[:5]})
        assert error(few) == (
            "baseline 'f': a 3-dimensional baseline needs at least 13 points (dimension + 10), got 5: with fewer, "
            "its mean and covariance are too uncertain for a useful threshold"
        )
        bad = await call(nexus, "set_baseline", {"baseline_id": "f", "points": POINTS, "threshold": "exact"})
        assert "payload.threshold: 'exact' is not one of ['finite', 'asymptotic']" in error(bad)
    async with serve(min_excess_points=2, threshold="asymptotic", max_points=13) as nexus:
        small = await call(nexus, "set_baseline", {"baseline_id": "s", "points": POINTS[:5]})
        assert (small.payload["count"], small.payload["threshold_method"]) == (5, "asymptotic")
        many = await call(nexus, "set_baseline", {"baseline_id": "s", "points": POINTS})
        assert error(many) == "baseline 's': 14 points are more than max_points 13"


async def test_a_baseline_given_as_csv_measures_like_the_same_points() -> None:
    """CSV text with a header fits the same baseline as the points array; bad CSV fails naming the line."""
    text = "a,b,c\n" + "".join(",".join(repr(v) for v in row) + "\n" for row in POINTS)
    async with serve() as nexus:
        from_csv = await call(nexus, "set_baseline", {"baseline_id": "csv", "csv": text})
        from_points = await call(nexus, "set_baseline", {"baseline_id": "arr", "points": POINTS})
        assert {**from_csv.payload, "baseline_id": "arr"} == from_points.payload
        probe = [11.0, 2.0, 0.1]
        a = await call(nexus, "monitor", {"baseline_id": "csv", "point": probe})
        b = await call(nexus, "monitor", {"baseline_id": "arr", "point": probe})
        assert a.payload["distance"] == b.payload["distance"]
        ragged = await call(nexus, "set_baseline", {"baseline_id": "x", "csv": "1,2\n3,4,5\n"})
        assert error(ragged) == (
            "baseline 'x': csv line 2 has 3 columns but line 1 has 2: every row needs the same number"
        )
        word = await call(nexus, "set_baseline", {"baseline_id": "x", "csv": "1,2\n3,four\n"})
        assert error(word) == "baseline 'x': csv line 2 column 2: 'four' is not a finite decimal number"
        both = await call(nexus, "set_baseline", {"baseline_id": "x", "csv": text, "points": POINTS})
        assert error(both) == "anomalies:set_baseline needs exactly one of points and csv"
        done = await call(nexus, "monitor", {"baseline_id": "arr", "point": probe})
        assert done.payload["distance"] == b.payload["distance"]  # the failures changed nothing
    async with serve(max_points=5, max_dimension=2) as nexus:
        rows = await call(nexus, "set_baseline", {"baseline_id": "x", "csv": "1\n" * 6})
        assert error(rows) == "baseline 'x': csv has more than 5 rows of points"
        wide = await call(nexus, "set_baseline", {"baseline_id": "x", "csv": "1,2,3\n"})
        assert error(wide) == "baseline 'x': csv line 1 has 3 columns, more than 2"


async def test_monitor_scores_a_batch_like_single_points_and_alerts_each_anomaly() -> None:
    """A batch answers each point's distance (as single requests do), the largest, the count of anomalies, one
    alert per anomaly, and stream_health counts every point of it; a batch over max_batch fails."""
    far = [30.0, 40.0, 5.0]
    batch = [POINTS[0], far, POINTS[3], [-20.0, 0.0, 0.5]]
    async with serve(max_batch=4, health_window=10) as nexus:
        alerts = await nexus.record("anomalies:alert:v1:raised")
        await call(nexus, "set_baseline", {"baseline_id": "m", "points": POINTS})
        health = StreamFollower(
            nexus.client.request("anomalies:stream_health:v1:requested", {"baseline_id": "m"}, heartbeats=False)
        )
        await health.wait_for(lambda chunks: len(chunks) == 1)
        singles = [(await call(nexus, "monitor", {"baseline_id": "m", "point": p})).payload for p in batch]
        await health.wait_for(lambda chunks: chunks[-1]["samples"] == 4)
        done = await call(nexus, "monitor", {"baseline_id": "m", "points": batch})
        assert done.payload["results"] == [
            {"point": s["point"], "distance": s["distance"], "is_anomaly": s["is_anomaly"]} for s in singles
        ]
        assert [r["is_anomaly"] for r in done.payload["results"]] == [False, True, False, True]
        assert done.payload["distance"] == max(s["distance"] for s in singles)
        assert (done.payload["is_anomaly"], done.payload["anomalies"]) == (True, 2)
        assert done.payload["threshold"] == singles[0]["threshold"]
        await health.wait_for(lambda chunks: chunks[-1]["samples"] == 8)
        assert (health.chunks[-1]["anomalies"], health.chunks[-1]["anomaly_pct"]) == (4, 50.0)
        received = await alerts.wait_count(4)
        assert [a.payload["point"] for a in received] == [far, [-20.0, 0.0, 0.5], far, [-20.0, 0.0, 0.5]]
        too_many = await call(nexus, "monitor", {"baseline_id": "m", "points": [*batch, far]})
        assert error(too_many) == "points has 5 points, more than max_batch 4"
        wrong = await call(nexus, "monitor", {"baseline_id": "m", "points": [POINTS[0], [1.0, 2.0]]})
        assert error(wrong) == "points: point has 2 coordinates but baseline 'm' has dimension 3"
        both = await call(nexus, "monitor", {"baseline_id": "m", "point": far, "points": batch})
        assert error(both) == "anomalies:monitor needs exactly one of point and points"
        empty = await call(nexus, "monitor", {"baseline_id": "m", "points": []})
        assert "payload.points: [] should be non-empty" in error(empty)
        await asyncio.sleep(0.1)
        assert len(alerts.events) == 4  # the failed requests raised none
        await health.cancel()
        await alerts.stop()


async def test_latest_answers_the_last_monitored_points_and_reset_forgets_them() -> None:
    """latest returns the last scored points (at most latest_points, or limit), oldest first; reset empties them
    and the health window but keeps the baseline; reset with forget drops the baseline."""
    async with serve(latest_points=3, health_window=10) as nexus:
        await call(nexus, "set_baseline", {"baseline_id": "m", "points": POINTS})
        empty = await call(nexus, "latest", {"baseline_id": "m"})
        assert empty.payload == {"baseline_id": "m", "points": []}
        scored = []
        for point in POINTS[:2]:
            scored.append((await call(nexus, "monitor", {"baseline_id": "m", "point": point})).payload)
        batch = await call(nexus, "monitor", {"baseline_id": "m", "points": [*POINTS[2:4], [30.0, 40.0, 5.0]]})
        wanted = [{k: s[k] for k in ("point", "distance", "is_anomaly")} for s in scored] + batch.payload["results"]
        latest = await call(nexus, "latest", {"baseline_id": "m"})
        assert latest.payload == {"baseline_id": "m", "points": wanted[-3:]}
        two = await call(nexus, "latest", {"baseline_id": "m", "limit": 2})
        assert two.payload["points"] == wanted[-2:]
        more = await call(nexus, "latest", {"baseline_id": "m", "limit": 50})
        assert more.payload["points"] == wanted[-3:]  # bounded by latest_points

        reset = await call(nexus, "reset", {"baseline_id": "m"})
        assert reset.payload == {"baseline_id": "m", "forgotten": False}
        assert (await call(nexus, "latest", {"baseline_id": "m"})).payload["points"] == []
        health = StreamFollower(
            nexus.client.request("anomalies:stream_health:v1:requested", {"baseline_id": "m"}, heartbeats=False)
        )
        (first,) = await health.wait_for(lambda chunks: len(chunks) == 1)
        assert (first["samples"], first["anomalies"], first["health"]) == (0, 0, "healthy")
        await health.cancel()
        still = await call(nexus, "monitor", {"baseline_id": "m", "point": POINTS[0]})
        assert still.payload["distance"] == scored[0]["distance"]

        gone = await call(nexus, "reset", {"baseline_id": "m", "forget": True})
        assert gone.payload == {"baseline_id": "m", "forgotten": True}
        unknown = "unknown baseline 'm': set it first with anomalies:set_baseline"
        assert error(await call(nexus, "monitor", {"baseline_id": "m", "point": POINTS[0]})) == unknown
        assert error(await call(nexus, "latest", {"baseline_id": "m"})) == unknown
        assert error(await call(nexus, "reset", {"baseline_id": "m"})) == unknown
        ended = await StreamFollower(
            nexus.client.request("anomalies:stream_health:v1:requested", {"baseline_id": "m"}, heartbeats=False)
        ).ended()
        assert ended.payload["error"]["message"] == unknown
        again = await call(nexus, "set_baseline", {"baseline_id": "m", "points": POINTS})
        assert again.state == "success"
        assert (await call(nexus, "monitor", {"baseline_id": "m", "point": POINTS[0]})).payload["distance"] == (
            scored[0]["distance"]
        )
        negative = await call(nexus, "latest", {"baseline_id": "m", "limit": -1})
        assert "payload.limit: -1 is less than the minimum of 0" in error(negative)


async def test_on_nats_batches_latest_and_reset_work_across_two_nodes() -> None:
    """Node a sets and resets baselines, node b monitors and answers latest: b scores a batch against a's
    baseline, latest on b sees it, a's reset empties it on b, and a's forget makes b answer unknown baseline."""
    url = shared_nats_url()
    stream, prefix = unique_names("anombase")
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(delete_stream, url, stream)
        settings = nats_settings(url, stream, prefix)
        node_a = await stack.enter_async_context(
            run_server(
                HandlerSpec("anomalies.set_baseline", SetBaseline(), "--handler"),
                HandlerSpec("anomalies.reset", Reset(), "--handler"),
                settings=settings,
            )
        )
        await stack.enter_async_context(
            run_server(
                HandlerSpec("anomalies.monitor", Monitor(), "--handler"),
                HandlerSpec("anomalies.latest", Latest(), "--handler"),
                settings=settings,
            )
        )
        done = await call(node_a, "set_baseline", {"baseline_id": "m", "points": POINTS})
        batch = await call(node_a, "monitor", {"baseline_id": "m", "points": POINTS[:3]})
        assert batch.payload["threshold"] == done.payload["threshold"]
        assert [r["point"] for r in batch.payload["results"]] == POINTS[:3]
        latest = await call(node_a, "latest", {"baseline_id": "m"})
        assert latest.payload["points"] == batch.payload["results"]
        await call(node_a, "reset", {"baseline_id": "m"})
        assert (await call(node_a, "latest", {"baseline_id": "m"})).payload["points"] == []
        await call(node_a, "reset", {"baseline_id": "m", "forget": True})
        gone = await call(node_a, "monitor", {"baseline_id": "m", "point": POINTS[0]})
        assert error(gone) == "unknown baseline 'm': set it first with anomalies:set_baseline"


async def test_a_baseline_outlives_a_restart_on_the_memory_bus_until_it_is_forgotten(tmp_path: Any) -> None:
    """set_baseline keeps the baseline in the plugin's store (data_dir): after a restart, on a memory bus whose
    history is empty, monitor, latest, stream_health and reset still know it; reset with forget drops it for
    good; another data directory never knew it."""
    data = str(tmp_path / "data")
    async with run_server(*handlers(), data_dir=data) as nexus:
        assert (await call(nexus, "set_baseline", {"baseline_id": "machine-7", "points": POINTS})).state == "success"
        before = await call(nexus, "monitor", {"baseline_id": "machine-7", "point": [30.0, 1.0, 0.5]})
    async with run_server(*handlers(), data_dir=data) as nexus:
        assert await nexus.bus.head_offset() == 0  # nothing of the earlier run is on the bus
        after = await call(nexus, "monitor", {"baseline_id": "machine-7", "point": [30.0, 1.0, 0.5]})
        assert after.state == "success", after.payload
        assert after.payload["distance"] == pytest.approx(before.payload["distance"], rel=1e-12)
        assert after.payload["threshold"] == before.payload["threshold"]
        assert (await call(nexus, "latest", {"baseline_id": "machine-7"})).state == "success"
    async with run_server(*handlers(), data_dir=data) as nexus:

        async def first_health() -> Event:
            stream = nexus.client.request("anomalies:stream_health:v1:requested", {"baseline_id": "machine-7"})
            async for event in stream:
                if event.state in ("stream", "failed"):
                    return event
            raise AssertionError("stream_health ended without a chunk")

        health = await asyncio.wait_for(first_health(), GUARD)
        assert health.state == "stream", health.payload
        assert (await call(nexus, "reset", {"baseline_id": "machine-7", "forget": True})).state == "success"
    async with run_server(*handlers(), data_dir=data) as nexus:
        gone = await call(nexus, "monitor", {"baseline_id": "machine-7", "point": [1.0, 1.0, 1.0]})
        assert "unknown baseline" in error(gone)
    async with run_server(*handlers(), data_dir=str(tmp_path / "other")) as nexus:
        never = await call(nexus, "monitor", {"baseline_id": "machine-7", "point": [1.0, 1.0, 1.0]})
        assert "unknown baseline" in error(never)


async def test_on_nats_a_baseline_outlives_the_stream_history_and_a_node_restart() -> None:
    """On the NATS bus the baseline lives in the deployment's key-value bucket: node b, started after node a
    set it and after the stream that carried it was deleted, still monitors against it."""
    url = shared_nats_url()
    stream, prefix = unique_names("anomkv")
    settings = nats_settings(url, stream, prefix)
    try:
        setter = HandlerSpec("anomalies.set_baseline", SetBaseline(), "--handler")
        async with run_server(setter, settings=settings) as a:
            assert (await call(a, "set_baseline", {"baseline_id": "pump-2", "points": POINTS})).state == "success"
        await delete_stream(url, stream)  # the history is gone; the bucket is not
        async with run_server(HandlerSpec("anomalies.monitor", Monitor(), "--handler"), settings=settings) as b:
            scored = await call(b, "monitor", {"baseline_id": "pump-2", "point": POINTS[0]})
            assert scored.state == "success", scored.payload
            assert scored.payload["is_anomaly"] is False
    finally:
        await delete_stream(url, f"KV_{stream}_KV")
        await delete_stream(url, stream)
