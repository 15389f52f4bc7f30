"""How fast the command line answers `--help` and an argument error, against a baseline commit.

Runs each case as a fresh process N times (interleaved with the baseline, medians reported) and
prints one JSON object. The baseline is a git revision checked out into a temporary worktree
(default 77a5b96, before the package layout and lazy imports: there the CLI was the top-level
module `cli` and imported torch at start-up). Run from a checkout with the venv active:

    python benchmarks/cli_startup.py [--baseline REV] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {"help": ["--help"], "index_help": ["index", "--help"],
         "argument_error": ["query", "/", "x.jpg", "--out", "results.parquet", "--largest"]}


def timed(command: list[str], cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="77a5b96", help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
                       check=True, capture_output=True)
        try:
            # the baseline's CLI is the top-level module `cli` of its checkout
            old = [sys.executable, "-c", "import sys; sys.path.insert(0, '.'); import cli; sys.argv[0] = 'reidx'; "
                                         "cli.main()"]
            new = [sys.executable, "-m", "reidx.cli"]
            samples = {case: {"baseline": [], "current": []} for case in CASES}
            for case, case_args in CASES.items():
                timed(old + case_args, baseline, env), timed(new + case_args, REPO, env)  # warm the file cache
                for _ in range(args.repeats):
                    samples[case]["baseline"].append(timed(old + case_args, baseline, env))
                    samples[case]["current"].append(timed(new + case_args, REPO, env))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)],
                           capture_output=True)
    result = {"benchmark": "cli_startup", "baseline": args.baseline, "repeats": args.repeats, "cases": {}}
    for case, runs in samples.items():
        base, now = statistics.median(runs["baseline"]), statistics.median(runs["current"])
        result["cases"][case] = {"baseline_median_s": round(base, 3), "current_median_s": round(now, 3),
                                 "speedup": round(base / now, 1)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
