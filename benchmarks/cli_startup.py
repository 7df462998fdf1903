"""How long ``omniar --help`` and a subcommand's ``--help`` take, in fresh processes (the target for
``omniar --help``: under 1.5 s). Only the chosen subcommand's module is imported, so the top-level help
loads no torch. Prints JSON; writes ``--out`` (default benchmarks/results/cli_startup.json).

    python benchmarks/cli_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cli_startup.json"
COMMANDS = {"omniar --help": ["--help"], "omniar generate --help": ["generate", "--help"],
            "omniar train ar --help": ["train", "ar", "--help"]}


def seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "omniar.cli", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command; the median is reported")
    parser.add_argument("--out", default=str(RESULTS), help="JSON file to write")
    args = parser.parse_args()
    seconds(["--help"])  # warm the file cache: the first run after a checkout reads every .pyc from disk
    report = {"python": platform.python_version(), "machine": platform.machine(), "repeats": args.repeats,
              "median_s": {name: statistics.median(seconds(argv) for _ in range(args.repeats))
                           for name, argv in COMMANDS.items()}}
    report["target_met"] = report["median_s"]["omniar --help"] < 1.5
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
