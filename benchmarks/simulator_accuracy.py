"""How close `geotrain simulate` comes to real runs, calibrated once.

    .venv/bin/python benchmarks/simulator_accuracy.py [--quick]

One real run calibrates the simulator (topologies/demo.yaml, synchronous DiLoCo, as shipped). Then, for
each target — the demo with twice the rounds, streaming DiLoCo, async DiLoCo, and
topologies/three-continents.yaml (a site the calibration run did not have, other links) — a real launch
and a simulation of the same topology calibrated on that first run only. Printed per target and figure
(wall seconds, compute utilisation, WAN bytes, rounds completed): predicted, measured, predicted /
measured, and whether it is within 10 %. The real runs use this shared 2-core machine: their wall time
moves with its load, and so does the calibration. Asserts nothing. Writes
benchmarks/results/simulator_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, launch, save  # noqa: E402

DEMO = REPO / "topologies" / "demo.yaml"
THREE = REPO / "topologies" / "three-continents.yaml"


def simulate(topology: Path, overrides: tuple[str, ...], calibrate: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="geotrain-sim-")) / "run"
    argv = [sys.executable, "-m", "geotrain.cli", "simulate", str(topology), "--calibrate", str(calibrate),
            "--run-dir", str(out)]
    for o in overrides:
        argv += ["--set", o]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"simulate {topology} failed:\n{r.stderr}")
    return json.loads((out / "summary.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds everywhere")
    args = p.parse_args()
    r = 4 if args.quick else 8
    calib = launch(DEMO, f"training.rounds={r}")
    targets = {
        f"demo sync, {2 * r} rounds": (DEMO, (f"training.rounds={2 * r}",)),
        "demo streaming P=2": (DEMO, (f"training.rounds={r}", "training.algorithm=streaming-diloco",
                                      "training.streaming.fragments=2", "training.streaming.overlap_steps=2")),
        "demo async": (DEMO, (f"training.rounds={r}", "training.algorithm=async-diloco")),
        "three-continents sync": (THREE, (f"training.rounds={r}",)),
    }
    rows = {}
    figures = ("wall_seconds", "utilisation", "wan_bytes", "rounds_completed")
    print(f"calibrated on: demo sync, {r} rounds ({calib['run_dir']})")
    print(f"{'target':26} {'figure':16} {'predicted':>12} {'measured':>12} {'ratio':>7}  within 10 %")
    for name, (topo, overrides) in targets.items():
        real = launch(topo, *overrides)
        sim = simulate(topo, overrides, Path(calib["run_dir"]))
        rows[name] = {}
        for f in figures:
            a, b = sim.get(f), real.get(f)
            ratio = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
            ok = ratio is not None and abs(ratio - 1) <= 0.10
            rows[name][f] = {"predicted": a, "measured": b, "ratio": ratio, "within_10pct": ok}
            print(f"{name:26} {f:16} {a:>12,.4g} {b:>12,.4g} {ratio:7.3f}  {'yes' if ok else 'NO'}"
                  if ratio is not None else f"{name:26} {f:16} {a!s:>12} {b!s:>12} {'-':>7}  -")
        rows[name]["real_run_dir"] = real["run_dir"]
    print(f"wrote {save('simulator_accuracy', {'calibration_run': calib['run_dir'], 'rounds': r, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
