"""Run every benchmark in turn (each starts its own etcd and daemons) and summarise.

    python bench/run_all.py                 # all of them
    python bench/run_all.py storm scale     # some of them

Each benchmark's own output is streamed as it runs; the summary at the end
lists every target with its measured value, floor, ratio and verdict. The exit
status is non-zero if any benchmark missed a target or failed to run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from common import BENCH_DIR, fmt, print_table

BENCHMARKS = ["allocate_latency", "storm", "cni_startup", "burst", "scale", "policy_change",
              "record_cost", "topology_routes"]


def run(name: str, timeout: float) -> tuple[int, dict[str, Any] | None, float]:
    started = time.monotonic()
    print(f"\n########## {name}", flush=True)
    process = subprocess.Popen([sys.executable, str(BENCH_DIR / f"{name}.py")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = None
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if line.startswith("BENCH-RESULT "):
                result = json.loads(line[len("BENCH-RESULT "):])
            else:
                print(line, end="", flush=True)
            if time.monotonic() - started > timeout:
                raise subprocess.TimeoutExpired(name, timeout)
        status = process.wait()
    except subprocess.TimeoutExpired:
        process.terminate()  # the benchmark's own clean-up stops its etcd and daemons
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        print(f"{name}: timed out after {timeout:g}s")
        status = 124
    return status, result, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default all: {', '.join(BENCHMARKS)})")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds before one benchmark is stopped (default 300)")
    args = parser.parse_args()
    names = args.names or BENCHMARKS
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(BENCHMARKS)}")
    rows: list[list[str]] = []
    failed = []
    for name in names:
        status, result, seconds = run(name, args.timeout)
        if result is None:
            failed.append(name)
            rows.append([name, "(did not finish)", "-", "-", "-", "-", f"ERROR {status}"])
            continue
        if status != 0:
            failed.append(name)
        for target in result["targets"]:
            ratio = target["ratio"]
            rows.append([name, target["name"], f"{fmt(target['measured'])} {target['unit']}",
                         "-" if target["floor"] is None else fmt(target["floor"]),
                         "-" if ratio is None else f"{ratio:.2f}x", target["limit_text"],
                         target["verdict"]])
        rows.append([name, f"({seconds:.0f} s, exit {status})", "", "", "", "", ""])
    print_table("summary", ["benchmark", "target", "measured", "floor", "ratio", "limit",
                            "result"], rows)
    print(f"\n{len(names) - len(failed)}/{len(names)} benchmarks met every target"
          + (f"; missed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
