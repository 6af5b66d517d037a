"""The coordinator's memory with many sites of a large model (issue #14: with 8 sites of a 100 MB model,
at most 400 MB above its idle size; in general ~3x the model's bytes plus a constant, for any number of sites).

    .venv/bin/python benchmarks/coordinator_memory.py [--mb 100] [--sites 2,8] [--rounds 3]

A real coordinator (geotrain's engine behind its gRPC server, in a process of its own) holds a model of
``--mb`` MB of float32 (its parameters, set before the sites come, as after InitModel); ``S`` site
processes (geotrain.worker.client.CoordinatorClient, the client site leaders use) join and merge
``--rounds`` rounds of a full-size update each, all at once. This process samples the coordinator's
resident set (/proc/PID/status VmRSS) every 20 ms and reads its peak (VmHWM) at the end.

Printed per S: idle RSS (model held, no site yet), peak RSS, peak above idle, and that over the model's
bytes. What the coordinator must hold at the peak: the model, the outer optimizer's momentum, the
round's running sum (orchestrator/aggregate.py) and every update still being received (each stream
lands in one buffer of the model's size, geotrain.wire.receive, until it is checked and added). Asserts
nothing. Writes benchmarks/results/coordinator_memory.json.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save  # noqa: E402


def window_bytes(window_mb: float | None) -> int:
    """Every stream's HTTP/2 window, both ends: ``window_mb``, else what a launch of topologies/demo.yaml uses
    (geotrain.config.derive.stream_window_bytes: sized from its links, 8 MiB)."""
    if window_mb is not None:
        return int(window_mb * (1 << 20))
    from geotrain.config.derive import stream_window_bytes
    from geotrain.config.topology import load_topology

    return stream_window_bytes(load_topology(Path(__file__).resolve().parents[1] / "topologies" / "demo.yaml"))


def _coordinator(n: int, sites: tuple[str, ...], window_mb, ports, stop, stats, arenas=True) -> None:
    import torch

    from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
    from geotrain.orchestrator.server import create_server

    torch.set_num_threads(1)
    if arenas:  # what `geotrain coordinator` does at start (orchestrator/main.py)
        from geotrain.wire.buffers import limit_malloc_arenas

        limit_malloc_arenas()
    engine = CoordinatorEngine(EngineConfig(sites=sites))
    engine.params = torch.zeros(n)
    server, port = create_server(engine, window_bytes=window_bytes(window_mb))
    ports.put(port)
    stop.wait()
    stats.put({"pool_allocated": engine.buffers.allocated, "pool_reused": engine.buffers.reused,
               "pool_held": engine.buffers.held()})
    server.stop(0).wait()


def _site(address: str, site: str, n: int, rounds: int, window_mb, barrier, done) -> None:
    import torch

    from geotrain.worker.client import CoordinatorClient

    torch.set_num_threads(1)
    client = CoordinatorClient(address, site, timeout_s=900, window_bytes=window_bytes(window_mb))
    client.join(1)
    update = torch.full((n,), 1e-3)
    for r in range(rounds):
        barrier.wait()
        client.merge(update, round=r, kind="pseudo_grad", version=r)
    client.close()
    done.put(site)


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(mb: float, n_sites: int, rounds: int, window_mb: float | None = None, arenas: bool = True) -> dict:
    n = int(mb * 1e6) // 4
    sites = tuple(f"s{i}" for i in range(n_sites))
    ctx = mp.get_context("spawn")  # never fork a process that runs gRPC threads
    ports, stop, stats = ctx.Queue(), ctx.Event(), ctx.Queue()
    coord = ctx.Process(target=_coordinator, args=(n, sites, window_mb, ports, stop, stats, arenas))
    coord.start()
    port = ports.get(timeout=120)
    time.sleep(1.0)
    idle_kb = status_kb(coord.pid, "VmRSS")
    samples: list[int] = []
    running = threading.Event()
    running.set()

    def sample() -> None:
        while running.is_set():
            try:
                samples.append(status_kb(coord.pid, "VmRSS"))
            except (FileNotFoundError, KeyError):
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    barrier, done = ctx.Barrier(n_sites), ctx.Queue()
    procs = [ctx.Process(target=_site, args=(f"127.0.0.1:{port}", s, n, rounds, window_mb, barrier, done)) for s in sites]
    t0 = time.perf_counter()
    try:
        for p in procs:
            p.start()
        for _ in procs:
            done.get(timeout=1800)
        seconds = time.perf_counter() - t0
        peak_kb = status_kb(coord.pid, "VmHWM")
    finally:
        running.clear()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        stop.set()
        pool = stats.get(timeout=60)
        coord.join(30)
        if coord.is_alive():
            coord.kill()
    model_mb = 4 * n / 1e6
    above = (peak_kb - idle_kb) / 1e3
    return {"sites": n_sites, "model_mb": model_mb, "rounds": rounds, "seconds": round(seconds, 1),
            "idle_rss_mb": idle_kb / 1e3, "peak_rss_mb": peak_kb / 1e3, "max_sampled_rss_mb": max(samples) / 1e3,
            "peak_above_idle_mb": above, "peak_above_idle_over_model": above / model_mb,
            "window_mb": window_bytes(window_mb) / (1 << 20), "malloc_arenas_limited": arenas, **pool}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100.0, help="model size in MB of float32")
    ap.add_argument("--sites", default="2,8", help="comma-separated numbers of sites")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window-mb", type=float, default=None,
                    help="every stream's HTTP/2 window, both ends (default: a demo launch's, sized from its links; "
                         "64 was every run's until 2026-12-04)")
    ap.add_argument("--default-arenas", action="store_true",
                    help="leave glibc's malloc arenas as they are (the coordinator limits them: geotrain.wire.buffers)")
    args = ap.parse_args()
    rows = [measure(args.mb, int(s), args.rounds, args.window_mb, not args.default_arenas) for s in args.sites.split(",")]
    print(f"coordinator RSS, a {args.mb:g} MB model, {args.rounds} rounds of full-size updates from every site at once")
    print(f"{'sites':>5} {'idle MB':>8} {'peak MB':>8} {'above idle MB':>14} {'/ model':>8}  (target for 8 sites of 100 MB: "
          f"<= 400 MB above idle)")
    for r in rows:
        print(f"{r['sites']:>5} {r['idle_rss_mb']:8.0f} {r['peak_rss_mb']:8.0f} {r['peak_above_idle_mb']:14.0f} "
              f"{r['peak_above_idle_over_model']:8.2f}  ({r['seconds']} s; buffers of the model's size the pool "
              f"allocated {r['pool_allocated']}, reused {r['pool_reused']})")
    print(f"wrote {save('coordinator_memory', {'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
