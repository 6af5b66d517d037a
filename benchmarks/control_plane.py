"""How does one coordinator cope with many sites? Per-round overhead and memory at 100 and 1000 sites.

    .venv/bin/python benchmarks/control_plane.py [--sites 100 1000] [--numel 1000] [--rounds 3]

The coordinator is geotrain's CoordinatorEngine served by ``create_server`` (real gRPC on loopback,
its default thread pool of max(16, 4 * sites + 8) workers), in a process of its own so that its memory,
CPU time, threads and file descriptors (read from its /proc/self/status, /proc/self/stat and
/proc/self/fd; psutil is not installed here) are its own and not the simulated sites'. Its
``EngineConfig(sites=...)`` lists N sites ``s0000 .. s<N-1>``; its model is ``--numel`` float32s.

The N simulated sites live in this process: one asyncio loop issuing N concurrent Merge calls with
geotrain's stub and wire format (``geotrain.wire.transport.encode``/``decode``), each site on a gRPC channel
of its own (a local subchannel pool, so N TCP connections, as N real sites would have). A warm-up round
opens the connections; then ``--rounds`` timed rounds, each releasing all N Merge calls at once:

* overhead: last arrival -> all results delivered. The last arrival is when the coordinator recorded the
  last update (its ``commit`` event's time minus its ``apply_s``: the commit starts right after it);
  delivered is when each site's Merge call returned here (same machine, same clock);
* arrival spread: first to last arrival at the coordinator (the commit event's ``wait_s``);
* round wall: the release of the N calls -> the last result delivered.

Then one "held" round: N-1 sites merge and wait while the last site is held back for --hold seconds;
the coordinator's CPU use meanwhile shows what N-1 blocked Merge calls cost (each handler thread wakes
every 0.2 s to poll for its round's commit).

Limits: a Merge call holds one server thread from its arrival until its round commits, and the round
commits only when every site's call has arrived, so the server needs a thread per site at once. The
last part shows what happens below that limit: N=100 sites with max_workers=50 and a 3 s round timeout.

Writes benchmarks/results/control_plane.json. No assertions: the box is a noisy shared 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc is imported (here and in the spawned coordinator)


def proc_status() -> dict:
    """This process's memory, threads, CPU seconds and open file descriptors."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])  # kB for Vm*
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    out["fds"] = len(os.listdir("/proc/self/fd"))
    return out


def _coordinator(n_sites: int, numel: int, events_path: str, max_workers: int | None, round_timeout_s: float,
                 conn) -> None:
    import torch

    from geotrain.events import EventLog
    from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
    from geotrain.orchestrator.server import create_server

    names = tuple(f"s{i:04d}" for i in range(n_sites))
    svc = CoordinatorEngine(EngineConfig(sites=names, round_timeout_s=round_timeout_s),
                             events=EventLog(events_path, "coordinator"))
    svc.params = torch.zeros(numel)
    before = proc_status()
    server, port = create_server(svc, max_workers=max_workers)
    pool = server._state.thread_pool if hasattr(server, "_state") else None
    conn.send({"port": port, "before": before, "after_start": proc_status(),
               "max_workers": getattr(pool, "_max_workers", None)})
    while True:
        cmd = conn.recv()
        if cmd == "status":
            conn.send(proc_status())
        else:
            server.stop(0)
            conn.send(proc_status())
            return


class Coordinator:
    def __init__(self, n_sites: int, numel: int, work: Path, max_workers: int | None = None,
                 round_timeout_s: float = 600.0):
        self.events_path = work / f"coordinator-{n_sites}-{max_workers}.jsonl"
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_coordinator, args=(n_sites, numel, str(self.events_path), max_workers,
                                                           round_timeout_s, child), daemon=True)
        self.proc.start()
        info = self.conn.recv()
        self.port, self.before, self.after_start, self.max_workers = (info["port"], info["before"], info["after_start"],
                                                                      info["max_workers"])

    def status(self) -> dict:
        self.conn.send("status")
        return self.conn.recv()

    def stop(self) -> dict:
        self.conn.send("stop")
        st = self.conn.recv()
        self.proc.join(10)
        return st

    def events(self, kind: str) -> list[dict]:
        from geotrain.events import read_events

        return [e for e in read_events(self.events_path) if e["event"] == kind]


class Sites:
    """N simulated sites on one asyncio loop, each with a channel of its own."""

    def __init__(self, n: int, port: int, numel: int):
        import grpc
        import numpy as np

        from geotrain._proto import coordinator_pb2_grpc as pb_grpc
        from geotrain.wire.channel import grpc_options

        self.names = [f"s{i:04d}" for i in range(n)]
        opts = grpc_options() + [("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) for _ in range(n)]
        self.stubs = [pb_grpc.CoordinatorStub(c) for c in self.channels]
        self.update = np.full(numel, 1e-3, dtype=np.float32)

    async def merge(self, i: int, rnd: int, timeout: float) -> tuple[float, str | None]:
        import grpc

        from geotrain.wire import transport

        msgs = list(transport.encode(self.update, site=self.names[i], round=rnd, kind="pseudo_grad", version=rnd))
        try:
            call = self.stubs[i].Merge(iter(msgs), timeout=timeout)
            transport.decode([m async for m in call])
            return time.time(), None
        except grpc.aio.AioRpcError as exc:
            return time.time(), f"{exc.code().name}: {exc.details()}"

    async def round(self, rnd: int, which: list[int], timeout: float = 600.0) -> tuple[float, list]:
        t0 = time.time()
        res = await asyncio.gather(*(self.merge(i, rnd, timeout) for i in which))
        return t0, res

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))


def errors_of(results: list) -> dict[str, int]:
    """Failed calls grouped by status and message (site lists and counts in messages folded)."""
    import re

    out: dict[str, int] = {}
    for _, err in results:
        if err:
            key = re.sub(r"s\d{4}(, s\d{4})*", "<sites>", err)
            key = re.sub(r"and \d+ sites are", "and <k> sites are", key)
            out[key] = out.get(key, 0) + 1
    return out


async def scale_run(n: int, numel: int, rounds: int, hold_s: float, work: Path) -> dict:
    coord = Coordinator(n, numel, work)
    sites = Sites(n, coord.port, numel)
    everyone = list(range(n))
    out: dict = {"sites": n, "numel": numel, "server_max_workers": coord.max_workers,
                 "coordinator_before_server": coord.before, "coordinator_after_server_start": coord.after_start}
    try:
        t0, res = await sites.round(0, everyone)  # warm-up: opens N connections
        out["warmup_round_s"] = round(max(t for t, _ in res) - t0, 4)
        errs = errors_of(res)
        if errs:
            out["errors"] = {"round 0": errs}
            return out
        out["coordinator_after_warmup"] = coord.status()
        rows = []
        for r in range(1, rounds + 1):
            c0, my0 = coord.status()["cpu_s"], proc_status()["cpu_s"]
            t0, res = await sites.round(r, everyone)
            c1, my1 = coord.status()["cpu_s"], proc_status()["cpu_s"]
            errs = errors_of(res)
            commit = next((e for e in coord.events("commit") if e["round"] == r), None)
            if errs or commit is None:
                out.setdefault("errors", {})[f"round {r}"] = errs or {"no commit event": 1}
                break
            delivered = [t for t, _ in res]
            last_arrival = commit["t"] - commit["apply_s"]
            rows.append({"round": r, "round_wall_s": round(max(delivered) - t0, 4),
                         "arrival_spread_s": round(commit["wait_s"], 4), "commit_s": round(commit["apply_s"], 6),
                         "overhead_s": round(max(delivered) - last_arrival, 4),
                         "coordinator_cpu_s": round(c1 - c0, 3), "sites_process_cpu_s": round(my1 - my0, 3),
                         "median_delivery_after_last_arrival_s": round(statistics.median(delivered) - last_arrival, 4)})
        out["rounds"] = rows
        st = coord.status()
        out["coordinator_after_rounds"] = st
        # held round: N-1 sites wait while the last one is held back
        r = rounds + 1
        task = asyncio.ensure_future(sites.round(r, everyone[:-1]))
        deadline = time.time() + 120
        while time.time() < deadline:
            await asyncio.sleep(0.1)
            import grpc

            from geotrain._proto import coordinator_pb2 as pb

            resp = await sites.stubs[-1].Status(pb.StatusRequest(), timeout=10)
            if len(resp.pending) >= n - 1:
                break
        a = coord.status()
        await asyncio.sleep(hold_s)
        b = coord.status()
        await sites.round(r, everyone[-1:])
        await task
        out["held_round"] = {"waiting_calls": n - 1, "hold_s": hold_s,
                             "coordinator_cpu_percent_while_waiting": round(100 * (b["cpu_s"] - a["cpu_s"]) / hold_s, 1),
                             "threads_while_waiting": b["Threads"], "fds_while_waiting": b["fds"],
                             "rss_kb_while_waiting": b["VmRSS"]}
    finally:
        await sites.close()
        out["coordinator_at_stop"] = coord.stop()
    return out


async def starved_run(n: int, max_workers: int, numel: int, round_timeout_s: float, work: Path) -> dict:
    """max_workers < sites: what a round does when the server cannot hold every site's call."""
    coord = Coordinator(n, numel, work, max_workers=max_workers, round_timeout_s=round_timeout_s)
    sites = Sites(n, coord.port, numel)
    try:
        t0, res = await sites.round(0, list(range(n)), timeout=round_timeout_s * 4 + 10)
        times = [t - t0 for t, _ in res]
        failed = coord.events("round_failed")
        commits = coord.events("commit")
        ok = sum(1 for _, e in res if e is None)
        return {"sites": n, "max_workers": max_workers, "round_timeout_s": round_timeout_s,
                "calls_ok": ok, "calls_failed": n - ok, "errors": errors_of(res),
                "first_return_s": round(min(times), 3), "last_return_s": round(max(times), 3),
                "round_failed_events": len(failed), "first_round_failed_reason": failed[0]["reason"] if failed else None,
                "committed": bool(commits), "commit_sites": len(commits[0]["sites"]) if commits else 0}
    finally:
        await sites.close()
        coord.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--numel", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hold", type=float, default=2.0, help="seconds the last site is held back in the held round")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from _common import save

    t_all = time.time()
    work = Path(tempfile.mkdtemp(prefix="geotrain-control-plane-"))
    runs = []
    for n in args.sites:
        res = asyncio.run(scale_run(n, args.numel, args.rounds, args.hold, work))
        runs.append(res)
    starved = asyncio.run(starved_run(100, 50, args.numel, 3.0, work))

    print(f"one coordinator, N sites merging {args.numel} float32s each (median of {args.rounds} rounds after a warm-up)")
    print(f"{'sites':>6} {'pool':>6} {'round wall s':>13} {'overhead s':>11} {'arrival spread s':>17} {'commit s':>9} "
          f"{'coord CPU s':>11} {'sites CPU s':>11} {'RSS MB':>7} {'RSS +MB':>8} {'threads':>8} {'fds':>5} "
          f"{'CPU% waiting':>13}")
    for r in runs:
        if r.get("errors"):
            print(f"{r['sites']:>6} BROKE: {r['errors']}")
        rows = r.get("rounds") or []
        if not rows:
            continue
        med = lambda k: statistics.median(x[k] for x in rows)  # noqa: E731
        base = r["coordinator_after_server_start"]["VmRSS"]
        peak = r["coordinator_at_stop"]["VmHWM"]
        h = r.get("held_round", {})
        r["summary"] = {"round_wall_s": med("round_wall_s"), "overhead_s": med("overhead_s"),
                        "arrival_spread_s": med("arrival_spread_s"), "commit_s": med("commit_s"),
                        "coordinator_cpu_s": med("coordinator_cpu_s"), "sites_process_cpu_s": med("sites_process_cpu_s"),
                        "rss_mb_peak": round(peak / 1024, 1), "rss_growth_mb": round((peak - base) / 1024, 1)}
        print(f"{r['sites']:>6} {r['server_max_workers']:>6} {med('round_wall_s'):>13.4f} {med('overhead_s'):>11.4f} "
              f"{med('arrival_spread_s'):>17.4f} {med('commit_s'):>9.5f} {med('coordinator_cpu_s'):>11.3f} "
              f"{med('sites_process_cpu_s'):>11.3f} {peak / 1024:>7.1f} {(peak - base) / 1024:>8.1f} "
              f"{h.get('threads_while_waiting', '-'):>8} {h.get('fds_while_waiting', '-'):>5} "
              f"{h.get('coordinator_cpu_percent_while_waiting', '-'):>13}")
    if len(runs) >= 2 and all(r.get("summary") for r in runs[:2]):
        a, b = runs[0], runs[1]
        k = b["sites"] / a["sites"]
        print(f"ratios {b['sites']}/{a['sites']} sites (x{k:g}): overhead x{b['summary']['overhead_s'] / a['summary']['overhead_s']:.1f}, "
              f"round wall x{b['summary']['round_wall_s'] / a['summary']['round_wall_s']:.1f}, "
              f"RSS growth x{b['summary']['rss_growth_mb'] / max(a['summary']['rss_growth_mb'], 0.1):.1f}")
    print("coord CPU s / sites CPU s: CPU seconds per round of the coordinator's process / of this process (the "
          "simulated sites). RSS +MB: the coordinator's peak RSS (VmHWM) minus its RSS once the server started "
          "(torch, grpc and the model already loaded). CPU% waiting: the coordinator while N-1 Merge calls wait "
          "for the last site.")
    s = starved
    print(f"\nbelow the limit: {s['sites']} sites, max_workers={s['max_workers']}, round_timeout_s={s['round_timeout_s']:g}: "
          f"{s['calls_ok']} calls returned a result, {s['calls_failed']} failed; calls returned after "
          f"{s['first_return_s']:.1f}-{s['last_return_s']:.1f} s; round_failed events: {s['round_failed_events']}; "
          f"committed: {s['committed']} (with {s['commit_sites']} sites)")
    for err, count in s["errors"].items():
        print(f"  {count} x {err}")
    if s["committed"] and s["calls_failed"]:
        print(f"  NOTE: the coordinator committed the round with {s['commit_sites']} updates after telling "
              f"{s['calls_failed']} of those sites that it failed (ABORTED)")
    path = save("control_plane", {"numel": args.numel, "runs": runs, "starved": starved,
                                   "seconds": round(time.time() - t_all, 1)})
    print(f"wrote {path} ({time.time() - t_all:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
