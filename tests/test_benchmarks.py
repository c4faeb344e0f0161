"""The benchmarks stay runnable: a quick run produces every measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_delivery_benchmark_quick_run_reports_every_ratio() -> None:
    """`benchmarks/bench_delivery.py --quick` runs to the end and reports both ratios as positive numbers."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_delivery.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert report["bus_vs_queue_ratio"] > 0
    assert report["grpc_batched_vs_single_ratio"] > 0
    assert report["metrics_on_vs_off_ratio"] > 0
    assert report["events"] == 2_000
