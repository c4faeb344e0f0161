"""How the log template settings (Drain depth and similarity) do on real logs: one command, seeded.

    python benchmarks/eval_log_templates.py                          # this machine's dpkg and apt logs
    python benchmarks/eval_log_templates.py /var/log/syslog app.log  # any files
    python benchmarks/eval_log_templates.py --depths 4,6 --similarities 0.4,0.5 --json

For each file and each (depth, similarity) of the grid, with every other setting at its default:

- ``templates``: how many templates the miner ends with after reading the whole file.
- ``mixed``: for a dpkg log (lines ``DATE TIME ACTION ...``; a ``status`` line's action is ``status <state>``),
  the lines that fall into a template shared with lines of another action, and ``purity``: the share of lines
  whose template's most common action is their own. Separating dpkg's actions (``install``, ``configure``,
  ``status unpacked``, ...) is what lets the sequence model see the order of a package's steps.
- ``auc``: how well the sequence score tells real sequences from shuffled ones. A source learns the first
  ``--train`` share of the file (as ``stream_log`` would); the rest is cut into windows of ``--window`` lines,
  each scored as the mean ``-ln P(template | previous templates)`` under the frozen model (a line no template
  matches counts as one unseen symbol), and each window once more after a seeded shuffle of its lines. The AUC
  is the probability that a shuffled window scores above a real one (ties count half): 0.5 means the order is
  invisible to the model, 1 that every shuffled window looks stranger than every real one.
- ``alerts``: the share of lines after the warm-up that a source reading the whole file from its start raises
  an alert (MED or HIGH) on: the alert rate on normal lines, new templates' first lines included (they are
  MED for their first ``new_template_lines``); ``by score``: the same with ``new_template_lines`` 0, the
  alerts that the scores alone raise.

Prints a Markdown table (or JSON with ``--json``). The result depends only on the files and ``--seed``.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from nexus.handlers.anomalies.logs import LogSettings, LogSource, NGramModel

DEFAULT_PATHS = ("/var/log/dpkg.log", "/var/log/apt/history.log", "/var/log/apt/term.log")
UNSEEN = "<unseen>"


@dataclasses.dataclass(frozen=True)
class Row:
    path: str
    lines: int
    depth: int
    similarity: float
    templates: int
    mixed: int | None
    purity: float | None
    auc: float
    windows: int
    alerts: float
    score_alerts: float


def read_lines(path: str) -> list[str]:
    """The file's non-blank lines, decoded as UTF-8 with replacement characters."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def dpkg_action(line: str) -> str | None:
    """A dpkg.log line's action (``status`` with its state), or None when the line is not one."""
    parts = line.split()
    if len(parts) < 3 or not parts[0][:4].isdigit():
        return None
    return f"status {parts[3]}" if parts[2] == "status" and len(parts) > 3 else parts[2]


def separation(actions: Sequence[str | None], template_ids: Sequence[str]) -> tuple[int, float] | None:
    """(lines in a template shared with another action, purity), over the lines that have an action."""
    by_template: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for action, template_id in zip(actions, template_ids, strict=True):
        if action is not None:
            by_template[template_id][action] += 1
    total = sum(sum(counts.values()) for counts in by_template.values())
    if total == 0 or total < len(actions) / 2:
        return None  # not a dpkg log
    mixed = sum(sum(counts.values()) for counts in by_template.values() if len(counts) > 1)
    purity = sum(max(counts.values()) for counts in by_template.values()) / total
    return mixed, purity


def window_score(model: NGramModel, symbols: Sequence[str]) -> float:
    """The mean ``-ln P(symbol | previous symbols of the window)`` under a model that does not learn."""
    total = 0.0
    for i, symbol in enumerate(symbols):
        total -= math.log(model.probability(tuple(symbols[max(0, i - model.order) : i]), symbol))
    return total / len(symbols)


def auc(real: Sequence[float], shuffled: Sequence[float]) -> float:
    """P(shuffled > real) + P(equal) / 2 over every pair (the Mann-Whitney statistic, normalised)."""
    ordered = sorted(real)
    wins = 0.0
    for value in shuffled:
        below = _count_below(ordered, value)
        equal = _count_below(ordered, value, inclusive=True) - below
        wins += below + equal / 2
    return wins / (len(real) * len(shuffled))


def _count_below(ordered: Sequence[float], value: float, *, inclusive: bool = False) -> int:
    return (bisect.bisect_right if inclusive else bisect.bisect_left)(ordered, value)


def evaluate(path: str, lines: Sequence[str], settings: LogSettings, *, train: float, window: int, seed: int) -> Row:
    """One row of the table: one file under one setting."""
    # The whole file from its start, as stream_log with from_start: templates, actions, alerts.
    online = LogSource(path, settings)
    results = [online.score_line(line) for line in lines]
    template_ids = [r.template_id for r in results]
    graded = results[settings.warmup_lines :]
    alerts = sum(r.alert for r in graded) / len(graded) if graded else math.nan
    by_score = LogSource(path, dataclasses.replace(settings, new_template_lines=0))
    plain = [by_score.score_line(line) for line in lines][settings.warmup_lines :]
    score_alerts = sum(r.alert for r in plain) / len(plain) if plain else math.nan
    split = separation([dpkg_action(line) for line in lines], template_ids)
    # Real against shuffled windows under a model trained on the first part only.
    cut = int(len(lines) * train)
    trained = LogSource(path, settings)
    for line in lines[:cut]:
        trained.score_line(line)
    symbols = []
    for line in lines[cut:]:
        template = trained.miner.match(line)
        symbols.append(UNSEEN if template is None else f"T{template.template_id}")
    rng = random.Random(seed)
    real: list[float] = []
    shuffled: list[float] = []
    for start in range(0, len(symbols) - window + 1, window):
        chunk = symbols[start : start + window]
        mixed = list(chunk)
        rng.shuffle(mixed)
        real.append(window_score(trained.model, chunk))
        shuffled.append(window_score(trained.model, mixed))
    return Row(
        path=path,
        lines=len(lines),
        depth=settings.drain_depth,
        similarity=settings.drain_similarity,
        templates=len(online.miner),
        mixed=None if split is None else split[0],
        purity=None if split is None else split[1],
        auc=auc(real, shuffled) if real else math.nan,
        windows=len(real),
        alerts=alerts,
        score_alerts=score_alerts,
    )


def markdown(rows: Sequence[Row]) -> str:
    out = [
        "| file | lines | depth | similarity | templates | mixed lines | purity | AUC | windows | alerts | by score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mixed = "-" if r.mixed is None else str(r.mixed)
        purity = "-" if r.purity is None else f"{r.purity:.3f}"
        out.append(
            f"| {r.path} | {r.lines} | {r.depth} | {r.similarity:g} | {r.templates} | {mixed} | {purity} "
            f"| {r.auc:.3f} | {r.windows} | {_pct(r.alerts)} | {_pct(r.score_alerts)} |"
        )
    return "\n".join(out)


def _pct(share: float) -> str:
    return "-" if math.isnan(share) else f"{100 * share:.2f} %"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("paths", nargs="*", default=list(DEFAULT_PATHS), help="log files (default: dpkg, apt)")
    parser.add_argument("--depths", default="4,5,6,7", help="Drain depths, comma-separated")
    parser.add_argument("--similarities", default="0.3,0.4,0.5,0.6,0.7", help="Drain similarities")
    parser.add_argument("--train", type=float, default=0.6, help="share of each file the AUC model learns")
    parser.add_argument("--window", type=int, default=10, help="lines per real / shuffled window")
    parser.add_argument(
        "--new-template-lines", type=int, default=LogSettings.new_template_lines, help="MED lines of a new template"
    )
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a Markdown table")
    args = parser.parse_args(argv)
    if not 0 < args.train < 1 or args.window < 2:
        parser.error("--train must be between 0 and 1 and --window at least 2")
    depths = [int(d) for d in args.depths.split(",")]
    similarities = [float(s) for s in args.similarities.split(",")]
    rows: list[Row] = []
    for path in args.paths:
        try:
            lines = read_lines(path)
        except OSError as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        for depth in depths:
            for similarity in similarities:
                settings = LogSettings(
                    drain_depth=depth, drain_similarity=similarity, new_template_lines=args.new_template_lines
                )
                rows.append(evaluate(path, lines, settings, train=args.train, window=args.window, seed=args.seed))
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    else:
        print(markdown(rows))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
