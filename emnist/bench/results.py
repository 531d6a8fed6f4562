"""Turn worker logs into results: the original's result line and the JSON line after it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

RESULT_LINE = re.compile(
    r"Worker ID: (?P<worker_id>\d+) Iterations: (?P<iterations>\d+) "
    r"Time: (?P<seconds>[0-9.]+) Name: (?P<hostname>\S+)")


def parse_results(lines: Iterable[str]) -> list[dict[str, Any]]:
    """One record per worker result; the JSON line, when present, fills in the details.

    Lines may carry a watchdog prefix (timestamp, ``stdout:``), so both patterns are searched
    anywhere in the line.
    """
    out: list[dict[str, Any]] = []
    for line in lines:
        m = RESULT_LINE.search(line)
        if m:
            out.append({"worker_id": int(m["worker_id"]), "iterations": int(m["iterations"]),
                        "seconds": float(m["seconds"]), "hostname": m["hostname"]})
            continue
        at = line.find('{"emnist_result"')
        if at >= 0:
            try:
                record = json.loads(line[at:])["emnist_result"]
            except (ValueError, KeyError, TypeError):
                continue
            for r in reversed(out):
                if r["worker_id"] == record.get("worker_id") and "run_id" not in r:
                    r.update(record)
                    break
            else:
                out.append(record)
    return out


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table (readable in a terminal and pasteable into the README).

    ``columns``: (key, header, format spec).
    """
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([_fmt(r.get(k), spec) for k, _, spec in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


WORKER_COLUMNS = [("worker_id", "worker", ""), ("iterations", "iterations", ""),
                  ("seconds", "time (s)", ".2f"), ("accuracy", "accuracy", ".4f"),
                  ("samples_per_s", "samples/s", ",.0f"), ("stop_reason", "stopped by", ""),
                  ("hostname", "name", "")]
