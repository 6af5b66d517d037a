"""How fast and how small `geotrain validate` refuses hostile topology files (issue #11, item 7).

    .venv/bin/python benchmarks/hostile_topologies.py

Each case is a file that breaks one bound of the loader (geotrain/config/safeyaml.py and the typed
topology): a "billion laughs" alias bomb, 100,000 levels of nesting, huge or infinite numbers, a path
escaping the run directory, a file over the size limit, a 900 KB value. Each runs as a fresh
`python -m geotrain.cli validate FILE` process, measured by a wrapper process so that its peak RSS
is that child's alone. Prints per case: exit code, stderr lines, wall seconds, peak MB, and whether
it meets the targets (one line, exit 2, under 2 s, under 200 MB). One run on this machine (shared,
noisy): no assertions. Most of the time is the interpreter's start-up and imports, measured
separately as the `baseline: valid demo topology` row.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = "name: t\nsites:\n  - {name: a, workers: 1}\n  - {name: b, workers: 1}\n"
BOMB = BASE + 'lol0: &l0 ["lol"]\n' + "".join(
    f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10))
CASES = {
    "alias bomb (10^9 strings)": BOMB,
    "nesting 100,000 deep": BASE + "training: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "rounds: 1e18": BASE + "training: {rounds: 1.0e+18}\n",
    "seed: 10^23": BASE + "seed: 100000000000000000000000\n",
    "heartbeat_ttl_s: .inf": BASE + "recovery: {heartbeat_ttl_s: .inf}\n",
    "checkpoint.path ../../outside": BASE + "checkpoint: {path: ../../outside}\n",
    "file of 1 MiB + 1 line": BASE + "# " + "x" * (1 << 20) + "\n",
    "900 KB name": BASE + "name: " + "n" * 900_000 + "\n",
}
MEASURE = """
import json, resource, subprocess, sys, time
t = time.monotonic()
r = subprocess.run([sys.executable, "-m", "geotrain.cli", "validate", sys.argv[1]], capture_output=True, text=True)
print(json.dumps({"rc": r.returncode, "lines": len(r.stderr.strip().splitlines()), "wall_s": time.monotonic() - t,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measure(path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    return json.loads(r.stdout)


def main() -> int:
    print(f"{'case':34} {'exit':>4} {'lines':>5} {'wall s':>7} {'peak MB':>8}  targets (1 line, exit 2, <2 s, <200 MB)")
    m = measure(REPO / "topologies" / "demo.yaml")
    print(f"{'baseline: valid demo topology':34} {m['rc']:>4} {'-':>5} {m['wall_s']:7.2f} {m['maxrss_mb']:8.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in CASES.items():
            path = Path(tmp) / "hostile.yaml"
            path.write_text(text)
            m = measure(path)
            ok = m["rc"] == 2 and m["lines"] == 1 and m["wall_s"] < 2.0 and m["maxrss_mb"] < 200
            print(f"{name:34} {m['rc']:>4} {m['lines']:>5} {m['wall_s']:7.2f} {m['maxrss_mb']:8.1f}  {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
