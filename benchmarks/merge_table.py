"""A merge against the physical minimum, for payloads, bandwidths and site counts (issue #14's table).

    .venv/bin/python benchmarks/merge_table.py [--rows all|quick|fast] [--latency-ms 5]

Each row: one coordinator process (geotrain's engine behind its gRPC server, as a launched coordinator
serves), N site processes (geotrain.worker.client.CoordinatorClient, the client site leaders use) and,
per site, one ``geotrain link`` process (geotrain.wan.link.main, as the launcher starts one per site's
WAN link) of bandwidth B both ways and the given one-way latency. Every site sends P bytes (a float32
pseudo-gradient) and gets P bytes back (the new model); all start each round together (a barrier).

    minimum = 1 RTT + P / B + P / B        (each site on its own link: the hub's side is not modelled)

A round's merge time is from the first site's start to the last site's answer. Printed per row, each
measured in the same run with the same processes:

- ``raw``: the same bytes through the same kind of links with no geotrain code at all: each site a plain
  TCP socket (sendall P bytes, recv_into P bytes) to a hub process that answers every site once all N
  have sent (the coordinator's rule), with threads that release the GIL. It is what this machine and
  the emulator can move at all; where it is above the minimum, the machine, not the WAN, bounds the row.
- ``loopback``: geotrain's merge with no link (its CPU cost: encode, CRC32, checks, sum, outer step).
- ``merge``: geotrain's merge through the links; the first merge (a fresh connection and a fresh
  coordinator) and the steady figure, the median of the later half of the rounds (:func:`rounds_for`).

and the ratios issue #14 asks for: merge / minimum (target <= 1.15), and merge / max(minimum, raw),
the part of the time geotrain adds above what the machine can move. The machine is a shared 2-core box:
one run, no assertions; the load average is recorded. Writes benchmarks/results/merge_table.json.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save  # noqa: E402

MB = 1_000_000

# (sites, payload bytes, bandwidth Mbit/s)
ROWS = [
    (2, 40 * MB, 100), (2, 40 * MB, 1000), (2, 40 * MB, 10000),
    (2, 400 * MB, 100), (2, 400 * MB, 1000), (2, 400 * MB, 10000),
    (8, 40 * MB, 1000),
]
QUICK = [(2, 40 * MB, 1000), (8, 40 * MB, 1000)]
FAST = [r for r in ROWS if r[2] >= 1000]  # without the 100 Mbit/s rows (400 MB there: minutes a merge)


def minimum_s(nbytes: int, mbit: float, latency_ms: float) -> float:
    return 2 * latency_ms / 1000 + 2 * nbytes * 8 / (mbit * 1e6)


def rounds_for(nbytes: int, mbit: float) -> int:
    """Merges per measurement. The first rounds of a fresh coordinator are slower (8 sites x 40 MB on
    loopback: 2.8, 1.0, 0.86, 0.86, 0.91, then 0.74 s: fresh buffers' page faults, gRPC's own buffers),
    so the steady figure is the median of the later half; a 400 MB merge at 100 Mbit/s takes a minute."""
    if nbytes >= 100 * MB:
        return 2 if mbit < 1000 else 4
    return 8


def steady(seconds: list[float]) -> float:
    """The median of the later half of the rounds (of the second, with two)."""
    return statistics.median(seconds[len(seconds) // 2:])


# ---- the processes ----


def _coordinator(n: int, sites: tuple[str, ...], ports, stop, window: int) -> None:
    import torch

    from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
    from geotrain.orchestrator.server import create_server
    from geotrain.wire.buffers import limit_malloc_arenas

    torch.set_num_threads(1)
    limit_malloc_arenas()  # what `geotrain coordinator` does at start
    engine = CoordinatorEngine(EngineConfig(sites=sites))
    engine.params = torch.zeros(n)
    server, port = create_server(engine, window_bytes=window)
    ports.put(port)
    stop.wait()
    server.stop(0).wait()


def _site(address: str, site: str, n: int, rounds: int, barrier, results, window: int) -> None:
    import torch

    from geotrain.worker.client import CoordinatorClient

    torch.set_num_threads(1)
    client = CoordinatorClient(address, site, timeout_s=1800, window_bytes=window)
    client.join(1)
    update = torch.full((n,), 1e-3)
    for r in range(rounds):
        barrier.wait()
        t0 = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of this machine
        client.merge(update, round=r, kind="pseudo_grad", version=r)
        results.put((site, r, t0, time.monotonic()))
    client.close()


def _recv_exactly(sock: socket.socket, buf: bytearray, nbytes: int, peer: str) -> None:
    """Read ``nbytes`` from ``sock`` through ``buf`` (the bytes are not kept: only their time counts)."""
    got = 0
    while got < nbytes:
        k = sock.recv_into(buf, min(len(buf), nbytes - got))
        if not k:
            raise ConnectionError(f"{peer} closed mid-round")
        got += k


def _raw_hub(nsites: int, nbytes: int, rounds: int, ports) -> None:
    """Take ``nsites`` connections; each round read ``nbytes`` from each, then (all in) send ``nbytes`` back."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(nsites)
    ports.put(lsock.getsockname()[1])
    conns = [lsock.accept()[0] for _ in range(nsites)]
    arrived = threading.Barrier(nsites)
    answer = bytes(nbytes)

    def serve(c: socket.socket) -> None:
        buf = bytearray(1 << 22)
        for _ in range(rounds):
            _recv_exactly(c, buf, nbytes, "site")
            arrived.wait()
            c.sendall(answer)

    threads = [threading.Thread(target=serve, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    lsock.close()


def _raw_site(port: int, site: str, nbytes: int, rounds: int, barrier, results) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    payload = bytes(nbytes)
    buf = bytearray(1 << 22)
    for r in range(rounds):
        barrier.wait()
        t0 = time.monotonic()
        s.sendall(payload)
        _recv_exactly(s, buf, nbytes, "hub")
        results.put((site, r, t0, time.monotonic()))
    s.close()


def start_link(target: int, mbit: float, latency_ms: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from geotrain.wan.link import main; raise SystemExit(main())", "--name", "bench",
         "--target", f"127.0.0.1:{target}", "--bandwidth", f"{mbit}mbit", "--latency", f"{latency_ms}ms"],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"link did not start: {line!r}")
    return proc, int(line.split()[1])


def _collect(results, nsites: int, rounds: int, procs) -> list[float]:
    """Seconds per round: first start to last answer."""
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    for _ in range(nsites * rounds):
        while True:
            try:
                _, r, t0, t1 = results.get(timeout=5)
                break
            except Exception:  # queue.Empty: is everyone still alive?
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a benchmark process died (exit {dead[0].exitcode})") from None
        starts[r] = min(starts.get(r, t0), t0)
        ends[r] = max(ends.get(r, t1), t1)
    return [ends[r] - starts[r] for r in sorted(starts)]


def measure(mode: str, nsites: int, nbytes: int, mbit: float | None, latency_ms: float, rounds: int) -> list[float]:
    """``mode``: "geotrain" or "raw"; ``mbit`` None: loopback, no link."""
    from geotrain.wire.channel import window_for

    window = window_for([(mbit, latency_ms, 0.0)] if mbit else [])  # what a run over these links uses
    ctx = mp.get_context("spawn")  # never fork a process that runs gRPC threads
    ports, results, barrier = ctx.Queue(), ctx.Queue(), ctx.Barrier(nsites)
    stop = ctx.Event()
    sites = tuple(f"s{i}" for i in range(nsites))
    if mode == "geotrain":
        hub = ctx.Process(target=_coordinator, args=(nbytes // 4, sites, ports, stop, window))
    else:
        hub = ctx.Process(target=_raw_hub, args=(nsites, nbytes, rounds, ports))
    procs, links = [hub], []
    try:
        hub.start()
        port = ports.get(timeout=120)
        for site in sites:
            target = port
            if mbit is not None:
                link, target = start_link(port, mbit, latency_ms)
                links.append(link)
            if mode == "geotrain":
                p = ctx.Process(target=_site, args=(f"127.0.0.1:{target}", site, nbytes // 4, rounds, barrier, results,
                                                    window))
            else:
                p = ctx.Process(target=_raw_site, args=(target, site, nbytes, rounds, barrier, results))
            p.start()
            procs.append(p)
        out = _collect(results, nsites, rounds, procs)
        stop.set()
        for p in procs:
            p.join(60)
        return out
    finally:
        stop.set()
        for p in procs:
            if p.is_alive():
                p.kill()
        for link in links:
            link.terminate()
            try:
                link.wait(10)
            except subprocess.TimeoutExpired:
                link.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", choices=("all", "quick", "fast"), default="all",
                    help="quick: 2 and 8 sites x 40 MB at 1 Gbit/s; fast: every row at 1 Gbit/s and above")
    ap.add_argument("--latency-ms", type=float, default=5.0, help="one way")
    args = ap.parse_args()
    rows = {"all": ROWS, "quick": QUICK, "fast": FAST}[args.rows]
    lat = args.latency_ms
    loopback: dict[tuple[int, int], list[float]] = {}
    table = []
    for nsites, nbytes, mbit in rows:
        k = rounds_for(nbytes, mbit)
        if (nsites, nbytes) not in loopback:
            loopback[(nsites, nbytes)] = measure("geotrain", nsites, nbytes, None, lat, rounds_for(nbytes, 10000))
        raw = measure("raw", nsites, nbytes, mbit, lat, k)
        merge = measure("geotrain", nsites, nbytes, mbit, lat, k)
        low = minimum_s(nbytes, mbit, lat)
        raw_s = steady(raw)
        warm = steady(merge)
        row = {"sites": nsites, "payload_mb": nbytes / MB, "mbit": mbit, "latency_ms": lat, "minimum_s": low,
               "raw_s": raw, "loopback_s": loopback[(nsites, nbytes)], "merge_s": merge,
               "merge_over_minimum": warm / low, "first_over_minimum": merge[0] / low, "raw_over_minimum": raw_s / low,
               "merge_over_bound": warm / max(low, raw_s), "load": os.getloadavg()[0]}
        table.append(row)
        print(f"{nsites} sites  {nbytes / MB:5.0f} MB  {mbit:6.0f} Mbit/s: minimum {low:7.3f} s  raw {raw_s:7.3f} s  "
              f"loopback {steady(loopback[(nsites, nbytes)]):6.3f} s  merge first {merge[0]:7.3f} s "
              f"steady {warm:7.3f} s  | merge/min {warm / low:5.2f}  raw/min {raw_s / low:5.2f}  "
              f"merge/max(min,raw) {warm / max(low, raw_s):5.2f}  (load {row['load']:.1f})", flush=True)
    path = save("merge_table" if args.rows == "all" else f"merge_table_{args.rows}", {"rows": table, "latency_ms": lat})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
