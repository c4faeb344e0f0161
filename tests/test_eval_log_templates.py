"""benchmarks/eval_log_templates.py: its AUC is the Mann-Whitney statistic, and one command gives the same table."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from test_anomalies_logs import DPKG

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "eval_log_templates.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("eval_log_templates", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_auc_counts_every_pair_with_ties_as_half() -> None:
    """The AUC equals a count over every (real, shuffled) pair: shuffled above 1, equal 1/2."""
    evaluate = load()
    rng = random.Random(4)
    real = [rng.choice([0.5, 1.0, 1.5, 2.0]) + rng.random() * (i % 2) for i in range(40)]
    shuffled = [rng.choice([1.0, 1.5, 2.0, 2.5]) + rng.random() * (i % 3 == 0) for i in range(30)]
    pairs = [(1.0 if s > r else 0.5 if s == r else 0.0) for r in real for s in shuffled]
    assert evaluate.auc(real, shuffled) == pytest.approx(sum(pairs) / len(pairs))
    assert evaluate.auc([1.0, 2.0], [3.0, 4.0]) == 1.0
    assert evaluate.auc([1.0], [1.0]) == 0.5


def test_the_evaluation_is_one_reproducible_command(tmp_path: Path) -> None:
    """Run twice on a dpkg log it prints the same rows; depth 6 keeps every action apart, depth 4 does not."""
    log = tmp_path / "dpkg.log"
    rng = random.Random(1)
    blocks = [DPKG[i : i + 5] for i in range(0, len(DPKG), 5)]
    log.write_text("\n".join(line for _ in range(80) for line in rng.choice(blocks)) + "\n")
    command = [sys.executable, str(SCRIPT), str(log), "--depths", "4,6", "--similarities", "0.4,0.5", "--json"]
    runs = [subprocess.run(command, capture_output=True, text=True, timeout=120, check=True) for _ in range(2)]
    assert runs[0].stdout == runs[1].stdout
    rows = {(row["depth"], row["similarity"]): row for row in json.loads(runs[0].stdout)}
    assert len(rows) == 4
    assert (rows[6, 0.5]["mixed"], rows[6, 0.5]["purity"]) == (0, 1.0)
    assert rows[4, 0.4]["mixed"] > 0
    assert all(0.0 <= row["auc"] <= 1.0 and row["windows"] > 0 for row in rows.values())
