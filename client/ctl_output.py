"""How topoipamctl prints: tables, documents, warnings, report summaries, errors.

Tables are plain columns (kubectl's look); ``-o yaml|json`` documents; every
warning one ``warning: ...`` line on stderr; an error one ``error: ...`` line
on stderr (:func:`fail`). :func:`print_findings` is the shared tail of the
report verbs and decides their exit status.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import yaml

from topoipam.daemon.admin import Plan


def print_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    rows = [list(r) for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in [list(headers), *rows]:
        print("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


def print_document(data: Any, output: str) -> None:
    if output == "json":
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def show_labels(labels: dict[str, str] | Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "<none>"


def family_name(family: int) -> str:
    return f"IPv{family}"


def report(plan: Plan) -> int:
    for line in plan.lines:
        print(line)
    for message in plan.warnings:
        warn(message)
    return 0


def print_findings(report_name: str, problems: Sequence[str], warnings: Sequence[str],
                   counts: str, fail_on_warnings: bool) -> int:
    """The shared tail of every check verb: problems, warnings, one summary, the status.

    0: no problems (warnings allowed, unless ``fail_on_warnings``); 1: problems.
    """
    for line in problems:
        print(line)
    for line in warnings:
        print(f"warning: {line}")
    noted = f", {len(warnings)} warning(s)" if warnings else ""
    if problems:
        print(f"{report_name}: {len(problems)} problem(s){noted} found ({counts})")
        return 1
    print(f"{report_name}: OK{noted} ({counts})")
    return 1 if warnings and fail_on_warnings else 0


def fail(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 1
