"""How close `geotrain simulate` comes to real runs, calibrated once.

    .venv/bin/python benchmarks/simulator_accuracy.py [--quick] [--calibration-runs K]

K real runs (default 1) calibrate the simulator once (topologies/demo.yaml, synchronous DiLoCo, as shipped; with
K > 1 each fitted time is the median over the runs, geotrain.sim.calibrate.pool). Then, for
each target — the demo with twice the rounds, streaming DiLoCo, async DiLoCo, and
topologies/three-continents.yaml (a site the calibration run did not have, other links) — a real launch
and a simulation of the same topology calibrated on those first runs only. Printed per target and figure
(wall seconds, compute utilisation, WAN bytes, rounds completed): predicted, measured, predicted /
measured, and whether it is within 10 %. The real runs use this shared 2-core machine: their wall time
moves with its load, and so does the calibration. Every real run's processes share this machine's cores, so
the simulations are made with ``--shared-host`` (``--own-hosts``: without; three-continents has 6 workers where
the calibration had 4). Asserts nothing. Writes
benchmarks/results/simulator_accuracy.json (simulator_accuracy_pooledK.json with K > 1).

    .venv/bin/python benchmarks/simulator_accuracy.py --failure-rate [--mtbf-s 20] [--seed 1] [--rounds 60]

Goodput under a failure rate: one real run calibrates (the demo with one worker killed at a scheduled time, so
that the restart time and when the launcher's fault clock starts are measured, not assumed), then the demo
under ``fault_rate`` (mtbf_s, the default kinds: kill_worker, freeze_site, partition_link, seed) is run for real and simulated with the same seed: the
launcher's FaultDraws give both the same faults at the same times. Printed: goodput, wall seconds,
utilisation, rounds, predicted / measured. Writes benchmarks/results/simulator_accuracy_faults.json.
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


SHARED_HOST = True
"""Every real run here shares this machine's cores: simulate with ``--shared-host`` (``--own-hosts``: without)."""


def simulate(topology: Path, overrides: tuple[str, ...], calibrate: Path | list[Path]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="geotrain-sim-")) / "run"
    argv = [sys.executable, "-m", "geotrain.cli", "simulate", str(topology), "--run-dir", str(out)]
    if SHARED_HOST:
        argv.append("--shared-host")
    for c in calibrate if isinstance(calibrate, list) else [calibrate]:
        argv += ["--calibrate", str(c)]
    for o in overrides:
        argv += ["--set", o]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"simulate {topology} failed:\n{r.stderr}")
    return json.loads((out / "summary.json").read_text())


def with_faults(topology: Path, faults: list[dict]) -> Path:
    """A copy of ``topology`` with ``faults`` scheduled."""
    import yaml

    raw = yaml.safe_load(topology.read_text())
    raw["faults"] = faults
    out = Path(tempfile.mkdtemp(prefix="geotrain-sim-topo-")) / topology.name
    out.write_text(yaml.safe_dump(raw))
    return out


def row(name: str, f: str, a, b) -> dict:
    ratio = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
    ok = ratio is not None and abs(ratio - 1) <= 0.10
    print(f"{name:26} {f:16} {a:>12,.4g} {b:>12,.4g} {ratio:7.3f}  {'yes' if ok else 'NO'}"
          if ratio is not None else f"{name:26} {f:16} {a!s:>12} {b!s:>12} {'-':>7}  -")
    return {"predicted": a, "measured": b, "ratio": ratio, "within_10pct": ok}


def failure_rate(args) -> int:
    """Goodput under a failure rate, real and simulated with the same seed."""
    rate = (f"fault_rate.mtbf_s={args.mtbf_s:g}", f"fault_rate.seed={args.seed}")
    calib_topo = with_faults(DEMO, [{"kind": "kill", "target": "worker eu-west/0", "at": "20s"}])
    calibs = [launch(calib_topo, f"training.rounds={args.rounds // 2}") for _ in range(args.calibration_runs)]
    calib = calibs[0]
    overrides = (f"training.rounds={args.rounds}", *rate)
    real = launch(DEMO, *overrides)
    sim = simulate(DEMO, overrides, [Path(c["run_dir"]) for c in calibs])
    name = f"demo sync, mtbf {args.mtbf_s:g} s"
    print(f"calibrated on: demo sync, {args.rounds // 2} rounds, one worker killed at 20 s ({', '.join(c['run_dir'] for c in calibs)})")
    print(f"target: demo sync, {args.rounds} rounds, {' '.join(rate)} ({real['run_dir']})")
    drawn = [json.loads(x) for x in (Path(real["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    t0 = next((e["t"] for e in drawn if e.get("event") == "run_started"), drawn[0]["t"] if drawn else 0.0)
    faults = [(round(e["t"] - t0, 1), e.get("fault"), e.get("target")) for e in drawn if e.get("event") == "fault_injected"]
    print(f"faults in the real run: {faults}")
    print(f"{'target':26} {'figure':16} {'predicted':>12} {'measured':>12} {'ratio':>7}  within 10 %")
    rows = {f: row(name, f, sim.get(f), real.get(f))
            for f in ("goodput", "wall_seconds", "utilisation", "rounds_completed")}
    rows["real_run_dir"], rows["calibration_run"] = real["run_dir"], calib["run_dir"]
    rows["calibration_runs"] = [c["run_dir"] for c in calibs]
    rows["faults"] = faults
    result = {"mtbf_s": args.mtbf_s, "seed": args.seed, "rounds": args.rounds, "rows": rows}
    name = "simulator_accuracy_faults" + ("" if args.seed == 1 else f"_seed{args.seed}")  # one file per seed
    name += "" if args.calibration_runs == 1 else f"_pooled{args.calibration_runs}"
    print(f"wrote {save(name, result)}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds everywhere")
    p.add_argument("--failure-rate", action="store_true", help="only goodput under a failure rate")
    p.add_argument("--mtbf-s", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--calibration-runs", type=int, default=1, metavar="K",
                   help="real runs to calibrate with (each time the median over them)")
    p.add_argument("--own-hosts", action="store_true",
                   help="simulate each site on hardware of its own (no --shared-host): what the simulator is for "
                        "elsewhere, and not what the real runs of this benchmark have")
    args = p.parse_args()
    global SHARED_HOST
    SHARED_HOST = not args.own_hosts
    if args.failure_rate:
        return failure_rate(args)
    r = 8 if args.quick else 24  # ~15 s of steady steps after the standbys' ~12 s import (geotrain.sim.calibrate)
    calibs = [launch(DEMO, f"training.rounds={r}") for _ in range(args.calibration_runs)]
    calib = calibs[0]
    targets = {
        f"demo sync, {2 * r} rounds": (DEMO, (f"training.rounds={2 * r}",)),
        "demo streaming P=2": (DEMO, (f"training.rounds={r}", "training.algorithm=streaming-diloco",
                                      "training.streaming.fragments=2", "training.streaming.overlap_steps=2")),
        "demo async": (DEMO, (f"training.rounds={r}", "training.algorithm=async-diloco")),
        "three-continents sync": (THREE, (f"training.rounds={r}",)),
    }
    rows = {}
    figures = ("wall_seconds", "utilisation", "wan_bytes", "rounds_completed")
    print(f"calibrated on: demo sync, {r} rounds ({', '.join(c['run_dir'] for c in calibs)})")
    print(f"{'target':26} {'figure':16} {'predicted':>12} {'measured':>12} {'ratio':>7}  within 10 %")
    for name, (topo, overrides) in targets.items():
        real = launch(topo, *overrides)
        sim = simulate(topo, overrides, [Path(c["run_dir"]) for c in calibs])
        rows[name] = {}
        for f in figures:
            a, b = sim.get(f), real.get(f)
            ratio = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
            ok = ratio is not None and abs(ratio - 1) <= 0.10
            rows[name][f] = {"predicted": a, "measured": b, "ratio": ratio, "within_10pct": ok}
            print(f"{name:26} {f:16} {a:>12,.4g} {b:>12,.4g} {ratio:7.3f}  {'yes' if ok else 'NO'}"
                  if ratio is not None else f"{name:26} {f:16} {a!s:>12} {b!s:>12} {'-':>7}  -")
        rows[name]["real_run_dir"] = real["run_dir"]
    out = "simulator_accuracy" + ("" if args.calibration_runs == 1 else f"_pooled{args.calibration_runs}")
    print(f"wrote {save(out, {'calibration_run': calib['run_dir'], 'calibration_runs': [c['run_dir'] for c in calibs], 'rounds': r, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
