"""More random mixes than CI runs (tests/test_random_mix.py runs its CASES).

    .venv/bin/python scripts/fuzz_engine.py --seeds 100 200

Runs the engine-level property test for every seed in [first, last) and prints one line per seed;
exits non-zero on the first failure.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs=2, type=int, default=[100, 120], metavar=("FIRST", "LAST"))
    args = ap.parse_args()
    env = {**os.environ, "MADAKV_MIX_SEEDS": ",".join(str(s) for s in range(*args.seeds))}
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-x", str(ROOT / "tests" / "test_random_mix.py")]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
