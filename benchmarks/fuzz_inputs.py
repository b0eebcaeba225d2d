"""Long fuzzing run of the checkpoint readers and the recipe parser (issue 6).

Runs the same hypothesis properties as the CI tests (``tests/io/test_fuzz_readers.py``,
``tests/test_recipe_fuzz.py``) with many more examples: every generated input must either
load or raise a typed, user-facing error; anything else (a crash, a bare exception, a hang)
fails the run.

    python benchmarks/fuzz_inputs.py [--examples 3400]   # 3 reader properties x N + 3 recipe properties x N
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["tests/io/test_fuzz_readers.py", "tests/test_recipe_fuzz.py"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=3400, help="examples per property")
    args = ap.parse_args()
    env = {**os.environ, "PM_FUZZ_EXAMPLES": str(args.examples), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics", *TARGETS],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )
    elapsed = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    stats = re.findall(r"- (\d+) passing, (\d+) failing", out)
    passing = [int(p) for p, _ in stats]
    failing = [int(f) for _, f in stats]
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    print(f"properties run: {len(passing)}; generated inputs: {sum(passing) + sum(failing)}; "
          f"failing: {sum(failing)}; wall time {elapsed:.0f} s")
    print(summary)
    if proc.returncode != 0:
        print(out[-4000:])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
