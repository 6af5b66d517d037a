"""`geotrain simulate`: a run of a topology in simulated time (geotrain.sim.engine), written as a run directory.

    geotrain simulate TOPOLOGY [--set PATH=VALUE ...] [--params N] [--step-s S] [--run-dir DIR]
    geotrain simulate TOPOLOGY --calibrate RUN_DIR [--calibrate RUN_DIR ...] [--set ...] [--compare RUN_DIR] [--run-dir DIR]

Without ``--calibrate`` the model has the topology's built-in GPT's parameter count (or ``--params``) and
every inner step takes ``--step-s`` (times each site's ``slowdown``); ``--startup-s`` and ``--restart-s``
default to what a CPU launch here takes. With ``--calibrate RUN_DIR`` the times and sizes are fitted from
that real run (geotrain.sim.calibrate); TOPOLOGY may differ from that run's (more rounds, other links, more
sites: a site the run did not have takes the median step of those it had); ``--params`` then rescales the
payloads; several ``--calibrate`` runs (of one model) give each time as their median (geotrain.sim.calibrate.pool).
``--compare RUN_DIR`` prints predicted / measured for every summary figure. ``--sites N`` simulates N
copies of the topology's first site instead of its own (past the 256 sites a topology file may name).

It writes what a launch writes — ``metrics.jsonl``, ``summary.json`` (``simulated: true``, with the
parameters used), ``topology.json``, ``links/*.json`` — so ``geotrain report`` and ``geotrain check`` read it.
The last line on stdout is the run directory. Exit 0, or 2 for bad input (one line, no traceback).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from geotrain.config.schema import MAX_SITES
from geotrain.errors import GeotrainError, TopologyError
from geotrain.sim.model import on_shared_host, replicated

MAX_SIMULATED_SITES = 100_000
"""``--sites``: the most copies (10,000 were simulated in about a minute here: docs/results.md)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geotrain simulate", description=__doc__.splitlines()[0])
    p.add_argument("topology", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    p.add_argument("--params", type=float, default=None, help="model parameters (default: the topology's model)")
    p.add_argument("--step-s", type=float, default=0.05, help="seconds per inner step (without --calibrate)")
    p.add_argument("--startup-s", type=float, default=5.0)
    p.add_argument("--restart-s", type=float, default=5.0)
    p.add_argument("--coordinator-restart-s", type=float, default=3.0)
    p.add_argument("--step-events", choices=("each", "round"), default="each",
                   help="one inner_step event per step (as a real run) or per run of steps between merges")
    p.add_argument("--calibrate", type=Path, action="append", default=None, metavar="RUN_DIR",
                   help="fit the times and sizes from this real run; again for several (each time their median)")
    p.add_argument("--compare", type=Path, default=None, metavar="RUN_DIR")
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the link model's jitter and loss draws")
    p.add_argument("--shared-host", type=int, nargs="?", const=-1, default=None, metavar="CORES",
                   help="with --calibrate: the target's worker processes share one host of CORES cores (default: "
                        "this machine's) as the calibration run's did, e.g. both local launches on this machine; "
                        "CPU-bound times scale with the workers per core (geotrain.sim.model.on_shared_host)")
    p.add_argument("--sites", type=int, default=None, metavar="N",
                   help="simulate N copies of the topology's first site (site0 ... siteN-1, the default link each) "
                        f"instead of its sites: for planning past what one real run holds (a file: {MAX_SITES} sites)")
    return p


def _params(args, topo):
    from geotrain.config.topology import load_any
    from geotrain.sim.model import SimParams
    from geotrain.worker.main import gpt_config
    from geotrain.worker.model import param_count

    if args.calibrate is None:
        if args.shared_host is not None:
            raise TopologyError("--shared-host scales a calibration: give --calibrate RUN_DIR")
        numel = int(args.params) if args.params else param_count(gpt_config(topo))
        return SimParams.given(topo, numel, args.step_s, startup_s=args.startup_s, restart_s=args.restart_s,
                               coordinator_restart_s=args.coordinator_restart_s)
    from geotrain.sim.calibrate import fit, pool

    fits = [fit(run, load_any(run / "topology.json")) for run in args.calibrate]
    p = pool(fits, [str(run) for run in args.calibrate]) if len(fits) > 1 else fits[0][0]
    known = list(p.step_s.values())
    p.step_s = {s.name: p.step_s.get(s.name, statistics.median(known)) for s in topo.sites}
    fill = statistics.median(p.overhead_s.values()) if p.overhead_s else 0.0
    p.overhead_s = {s.name: p.overhead_s.get(s.name, fill) for s in topo.sites}
    if args.shared_host is not None:
        import os

        if args.shared_host != -1 and args.shared_host < 1:
            raise TopologyError(f"--shared-host {args.shared_host}: expected the host's cores (1 or more), or no "
                                f"number for this machine's")
        cores = (os.cpu_count() or 1) if args.shared_host == -1 else args.shared_host
        if p.host_workers is None:
            raise TopologyError("--shared-host: the calibration runs had different numbers of workers; give runs "
                                "of one topology")
        p = on_shared_host(p, sum(s.world_size for s in topo.sites), cores)
    if args.params:
        scale = args.params / p.numel
        p.numel = int(args.params)
        p.up_bytes = int(p.up_bytes * scale) if p.up_bytes else None
        p.down_bytes = int(p.down_bytes * scale) if p.down_bytes else None
    return p


def simulate(args) -> tuple[Path, dict]:
    from geotrain.config.topology import load_topology
    from geotrain.run.summary import compute_summary, rounds_completed
    from geotrain.sim.engine import Simulator

    topo = load_topology(args.topology, args.overrides)
    if args.sites is not None:
        if not 1 <= args.sites <= MAX_SIMULATED_SITES:
            raise TopologyError(f"--sites {args.sites}: expected 1 .. {MAX_SIMULATED_SITES:,}")
        if topo.faults or topo.links.pairs:
            raise TopologyError("--sites N copies the first site with the default link: the topology's faults and "
                                "links.pairs name sites the copies do not have; remove them (or simulate the file's "
                                "own sites)")
        need = max(topo.recovery.min_sites or 1, topo.training.quorum.min_sites if topo.training.quorum else 1)
        if args.sites < need:
            raise TopologyError(f"--sites {args.sites}: the topology's min_sites ({need}) needs at least that many sites")
        topo = replicated(topo, args.sites)
    params = _params(args, topo)
    sim = Simulator(topo, params, seed=args.seed, step_events=args.step_events)
    events = sim.run()
    run_dir = args.run_dir or Path("runs") / f"sim-{topo.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    (run_dir / "links").mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")
    (run_dir / "topology.json").write_text(json.dumps(topo.model_dump(mode="json")))
    stats = sim.link_stats()
    for name, st in stats.items():
        short = name.removeprefix("link ")
        (run_dir / "links" / f"{short.replace('<->', '--')}.json").write_text(json.dumps({"name": short, **st}))
    summary = compute_summary(events, topo, wall_seconds=sim.now, link_stats=stats)
    done = rounds_completed(events, topo) >= topo.training.rounds
    summary = {"status": "completed" if done else "failed",
               "reason": None if done else "the simulated run did not complete its rounds (a fault it could not "
                                           "recover from, or a round that timed out)",
               "simulated": True, "sim_params": params.to_json(), **summary}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return run_dir, summary


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        for given, what in [*((c, "--calibrate") for c in args.calibrate or ()), (args.compare, "--compare")]:
            if given is not None and not (given / "metrics.jsonl").is_file():
                raise TopologyError(f"{what} {given}: not a run directory (no metrics.jsonl)")
        run_dir, s = simulate(args)
    except GeotrainError as exc:
        print(f"geotrain simulate: {exc}", file=sys.stderr)
        return exc.exit_code
    util = s.get("utilisation")
    print(f"geotrain simulate: {s['rounds_completed']}/{s['rounds_planned']} rounds, {s['wall_seconds']:.1f} s "
          f"simulated, utilisation {util}, goodput {s.get('goodput')}, WAN {s['wan_bytes']:,} B", file=sys.stderr)
    if args.compare is not None:
        from geotrain.sim.calibrate import compare

        measured = json.loads((args.compare / "summary.json").read_text())
        print(f"{'figure':18} {'predicted':>14} {'measured':>14} {'ratio':>7}", file=sys.stderr)
        for name, a, b, r in compare(s, measured):
            fa = f"{a:,.4g}" if isinstance(a, (int, float)) else str(a)
            fb = f"{b:,.4g}" if isinstance(b, (int, float)) else str(b)
            print(f"{name:18} {fa:>14} {fb:>14} {f'{r:.3f}' if r is not None else '-':>7}", file=sys.stderr)
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
