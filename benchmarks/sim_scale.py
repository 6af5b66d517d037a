"""How large a simulation `geotrain simulate`'s engine runs on this machine: sites x rounds, seconds.

    .venv/bin/python benchmarks/sim_scale.py [--sites 1000] [--rounds 1000] [--also 10000x100]

A star of N sites (geotrain.sim.model.replicated: copies of one site, past the schema's 256-site cap of a real
run; 1 Gbit/s, 20 ms each to the coordinator; 100M parameters, int8 payloads; 0.5 s steps, H = 100;
inner steps written one event per run of steps: ``step_events="round"``), simulated to the end, then its
summary computed with ``--summary`` (geotrain.run.summary.compute_summary, as `geotrain simulate` does; it
indexes the events by site once: it filtered them once per site until 2026-12-04). Printed per size: the
seconds the simulation took (wall, and CPU: this machine is shared, and wall time moves with its load), the
summary's, events, simulated utilisation (sites' compute / sites x wall,
counted from the events), and peak memory. Asserts nothing; the issue's bar (1,000
sites x 1,000 rounds in under a minute) is read off the print. Writes benchmarks/results/sim_scale.json.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save  # noqa: E402

from geotrain.config.topology import parse_topology  # noqa: E402
from geotrain.run.summary import compute_summary  # noqa: E402
from geotrain.sim.engine import Simulator  # noqa: E402
from geotrain.sim.model import SimParams, replicated  # noqa: E402


def one(n: int, rounds: int, with_summary: bool) -> dict:
    base = parse_topology({"name": "scale", "sites": [{"name": "s", "workers": 1}],
                           "links": {"default": {"bandwidth": "1gbit", "latency": "20ms"}},
                           "training": {"inner_steps": 100, "rounds": rounds, "round_timeout_s": 1e6,
                                        "compression": {"codec": "int8"}}}, source="sim_scale")
    topo = replicated(base, n)  # past the schema's 256-site cap of a real run
    p = SimParams.given(topo, 100_000_000, 0.5, startup_s=5.0, init_bytes=0)
    t0, c0 = time.perf_counter(), time.process_time()
    sim = Simulator(topo, p, step_events="round")
    events = sim.run()
    t1, c1 = time.perf_counter(), time.process_time()
    summary = compute_summary(events, topo, wall_seconds=sim.now, link_stats=sim.link_stats()) if with_summary else {}
    t2 = time.perf_counter()
    row = {"sites": n, "rounds": rounds, "simulate_s": round(t1 - t0, 2), "simulate_cpu_s": round(c1 - c0, 2),
           "summary_s": round(t2 - t1, 2) if with_summary else None,
           "events": len(events), "simulated_wall_s": round(sim.now, 1),
           "utilisation": round(sum(e.get("compute_s", 0.0) for e in events if e["event"] == "inner_step")
                                / (n * sim.now), 4),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    print(f"{n:>6} sites x {rounds:>5} rounds: simulated in {row['simulate_s']:.1f} s "
          f"({row['simulate_cpu_s']:.1f} s CPU), summary {row['summary_s']} s, "
          f"{len(events):,} events, utilisation {row['utilisation']}, peak RSS {row['peak_rss_mb']} MB")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--also", action="append", default=None, help="more sizes, SITESxROUNDS (default 10000x100)")
    ap.add_argument("--summary", action="store_true",
                    help="also time compute_summary (geotrain.run.summary: O(sites x events), minutes at 1,000 sites)")
    args = ap.parse_args()
    rows = [one(args.sites, args.rounds, args.summary)]
    for size in args.also if args.also is not None else ["10000x100"]:
        n, r = (int(x) for x in size.split("x"))
        rows.append(one(n, r, args.summary))
    print(f"wrote {save('sim_scale', {'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
