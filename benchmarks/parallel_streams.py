"""Parallel streams (issue #14): a merge over a lossy long link, striped over 1..P TCP flows.

    .venv/bin/python benchmarks/parallel_streams.py [--mb 10] [--bandwidth-mbit 1000] [--latency-ms 35]
                                                    [--loss 0.0001] [--streams 1,4,16,64] [--merges 3]

With loss, one TCP flow gets at most MSS*1.22/(RTT*sqrt(loss)) (Mathis et al.) however wide the link:
20 Mbit/s on the default link (three-continents' us-east<->eu-west: 1 Gbit/s, 35 ms one way, 0.01 %
loss). `links.*.streams: P` stripes each connection over P flows (geotrain.wan.stripe) inside the
emulated WAN. For each P this runs a real `geotrain link --streams P` process between a geotrain
coordinator (in this process) and one site's CoordinatorClient, lets the site join and provide the
model (cold), then times ``--merges`` merges of an ``--mb`` MB float32 update (warm: the median).

Printed per P: the warm merge, the bandwidth minimum (1 RTT + up/bandwidth + down/bandwidth: what the
link allows), the flow minimum (the same at min(bandwidth, P * mathis): what P TCP flows allow) and
the ratios to both. Writes benchmarks/results/parallel_streams.json. One run on a shared 2-core box;
no assertions.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save  # noqa: E402


def run_one(nbytes: int, bandwidth: float, latency: float, loss: float, streams: int, n_merges: int) -> dict:
    import torch

    from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
    from geotrain.orchestrator.server import create_server
    from geotrain.wire.channel import window_for
    from geotrain.worker.client import CoordinatorClient

    window = window_for([(bandwidth, latency, 0.0)])
    n = nbytes // 4
    engine = CoordinatorEngine(EngineConfig(sites=("site",)))
    server, port = create_server(engine, window_bytes=window)
    link = subprocess.Popen([sys.executable, "-m", "geotrain.cli", "link", "--name", f"bench-{streams}",
                             "--target", f"127.0.0.1:{port}", "--bandwidth", f"{bandwidth:g}mbit",
                             "--latency", f"{latency:g}ms", "--loss", f"{loss:g}", "--streams", str(streams)],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = link.stdout.readline().split()
        if line[:1] != ["READY"]:
            raise SystemExit(f"geotrain link --streams {streams} did not start: {line}")
        client = CoordinatorClient(f"127.0.0.1:{line[1]}", "site", timeout_s=900, window_bytes=window)
        try:
            t0 = time.perf_counter()
            client.join(1)
            client.init_model(torch.zeros(n))
            cold = time.perf_counter() - t0
            update = torch.full((n,), 1e-3)
            times = []
            for r in range(n_merges):
                t0 = time.perf_counter()
                client.merge(update, round=r, kind="pseudo_grad", version=r)
                times.append(time.perf_counter() - t0)
        finally:
            client.close()
    finally:
        link.terminate()
        link.wait(10)
        server.stop(0)
    rtt = 2 * latency / 1000
    bw = bandwidth * 1e6 / 8
    mathis = 1448 * 1.22 / (rtt * math.sqrt(loss)) if loss > 0 else math.inf
    flow_rate = min(bw, streams * mathis)
    warm = statistics.median(times)
    link_min = rtt + 2 * nbytes / bw
    flow_min = rtt + 2 * nbytes / flow_rate
    return {"streams": streams, "bytes": nbytes, "merges_s": [round(t, 4) for t in times], "warm_s": round(warm, 4),
            "init_s": round(cold, 4), "bandwidth_minimum_s": round(link_min, 4), "flow_minimum_s": round(flow_min, 4),
            "vs_bandwidth": round(warm / link_min, 3), "vs_flows": round(warm / flow_min, 3),
            "flow_rate_mbit": round(flow_rate * 8 / 1e6, 1), "goodput_mbit": round(2 * nbytes * 8 / warm / 1e6, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=10.0)
    ap.add_argument("--bandwidth-mbit", type=float, default=1000.0)
    ap.add_argument("--latency-ms", type=float, default=35.0)
    ap.add_argument("--loss", type=float, default=0.0001)
    ap.add_argument("--streams", default="1,4,16,64")
    ap.add_argument("--merges", type=int, default=3)
    args = ap.parse_args()
    nbytes = int(args.mb * 1e6) // 4 * 4
    load = os.getloadavg()[0]
    rows = []
    print(f"link {args.bandwidth_mbit:g} Mbit/s, {args.latency_ms:g} ms one way, loss {args.loss:g}; "
          f"{nbytes / 1e6:.1f} MB each way; load {load:.2f}")
    print(f"{'streams':>7} {'flows allow':>12} {'warm merge':>11} {'goodput':>12} {'/ link min':>10} {'/ flow min':>10}")
    for p in [int(x) for x in args.streams.split(",")]:
        row = run_one(nbytes, args.bandwidth_mbit, args.latency_ms, args.loss, p, args.merges)
        rows.append(row)
        print(f"{p:>7} {row['flow_rate_mbit']:>7.1f} Mb/s {row['warm_s']:>9.3f} s {row['goodput_mbit']:>7.1f} Mb/s "
              f"{row['vs_bandwidth']:>10.2f} {row['vs_flows']:>10.2f}", flush=True)
    base = rows[0]["warm_s"]
    for row in rows[1:]:
        print(f"streams {row['streams']}: merge {base / row['warm_s']:.2f}x faster than streams {rows[0]['streams']}")
    path = save("parallel_streams", {"link": {"bandwidth_mbit": args.bandwidth_mbit, "latency_ms": args.latency_ms,
                                              "loss": args.loss}, "load_at_start": load, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
