"""How close does a merge come to what the wire allows? Two measurements from one run each.

    .venv/bin/python benchmarks/transport.py [--bandwidth-mbit 1000] [--latency-ms 5] [--no-tls]

(a) One merge through the WAN link emulator (geotrain.wan.link.LinkProxy, in this process, default
    1 Gbit/s and 5 ms one way, no jitter or loss) against the physical minimum, for the demo model's
    payload (482 KB) and a 40 MB one. The coordinator (in-process gRPC server, one site) and the site's
    CoordinatorClient are geotrain's own; the site joins and provides the initial model first, so the
    channel is connected (TCP and HTTP/2 set up) before the timed merge.

    Round trips: a merge is ONE gRPC call (Merge: a stream of chunks up, a stream of chunks down) on an
    HTTP/2 connection that is already open. The coordinator can answer only after the whole update
    arrived (the round needs every site's update), so the minimum is the upload's serialization, half
    an RTT for its last byte to arrive, the download's serialization, and half an RTT back:

        minimum = 1 RTT + payload_up / bandwidth + payload_down / bandwidth     (RTT = 2 x one-way latency)

    Printed: measured, minimum, measured/minimum, and the same merge on loopback without the link
    (the CPU cost of encode + CRC32 + decode + outer step, which no wire removes). The first merge on a
    fresh connection ("cold") and the median of the next ones ("warm": gRPC's BDP probe has grown the
    HTTP/2 flow-control window by then) are both shown; excess = measured - minimum, to compare with
    the loopback time. Client, coordinator and link share this one process (and its GIL).

(b) Raw throughput on loopback, no emulation: two site processes merge a 40 MB float32 vector through
    the coordinator (in this process), against torch.distributed's gloo all_reduce of the same tensor
    between two local processes. MB/s = 40 MB / (time of one merge or one all_reduce, median of 3 after
    a warm-up). A merge is a star (each site sends 40 MB to the coordinator and gets 40 MB back; the
    coordinator's one Python process takes in 80 MB and sends 80 MB per round); the 2-rank all_reduce
    exchanges the tensor directly between the two ranks, in C++.

(c) What TLS costs: the same merges as (a) with mutual TLS (the run's own certificates, made by
    geotrain.security.pki in a temporary folder: the coordinator's and the site's, as a launched run
    uses) and without, in the same run, each on loopback and through the link emulator. Printed: the
    median of the warm merges (the first, which includes the TLS handshake, is shown apart) and the
    ratio TLS / plaintext. ``--tls-only`` runs (c) alone.

The last lines print the two ratios issue #14 asks for: (b)'s geotrain / gloo, and (a)'s 40 MB warm
merge / minimum. Writes benchmarks/results/transport.json (with --tls-only: transport_tls.json). No
assertions: the box is a noisy shared 2-core machine (the load average is recorded with the figures).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIG = 40_000_000  # bytes


def demo_payload_bytes() -> int:
    from geotrain.config.topology import load_topology
    from geotrain.worker.model import GPTConfig, build_model

    m = load_topology(HERE.parent / "topologies" / "demo.yaml").model
    model = build_model(GPTConfig(block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd), seed=0)
    return sum(p.numel() for p in model.parameters()) * 4


# ---- (a) ----


def merges(nbytes: int, link: tuple[float, float] | None, n_merges: int = 4, tls=None) -> list[dict]:
    """Time ``n_merges`` consecutive merges of one site (through a LinkProxy when ``link`` is given;
    ``tls``: a geotrain.security.pki.CertDir whose certificates both ends use)."""
    import torch

    from geotrain.wan.link import LinkParams, LinkProxy
    from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
    from geotrain.orchestrator.server import create_server
    from geotrain.worker.client import CoordinatorClient

    n = nbytes // 4
    svc = CoordinatorEngine(EngineConfig(sites=("site",)))
    server, port = create_server(svc, tls=tls.files("coordinator") if tls else None)
    proxy = None
    try:
        address = f"127.0.0.1:{port}"
        if link is not None:
            proxy = LinkProxy("bench", ("127.0.0.1", port), LinkParams(link[0], latency_ms=link[1]))
            address = f"127.0.0.1:{proxy.start()}"
        client = CoordinatorClient(address, "site", timeout_s=600, tls=tls.files("site.site") if tls else None)
        try:
            client.join(1)
            client.init_model(torch.zeros(n))
            update = torch.full((n,), 1e-3)
            out = []
            for r in range(n_merges):
                before = proxy.stats() if proxy else None
                t0 = time.perf_counter()
                client.merge(update, round=r, kind="pseudo_grad", version=r)
                seconds = time.perf_counter() - t0
                row = {"round": r, "seconds": seconds}
                if proxy:
                    after = proxy.stats()
                    row["wire_up"] = after["bytes_forward"] - before["bytes_forward"]
                    row["wire_down"] = after["bytes_backward"] - before["bytes_backward"]
                out.append(row)
            return out
        finally:
            client.close()
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop(0)


# ---- (b) ----


def _site(address: str, site: str, n: int, rounds: int, barrier, results) -> None:
    import torch

    from geotrain.worker.client import CoordinatorClient

    torch.set_num_threads(1)
    client = CoordinatorClient(address, site, timeout_s=600)
    client.join(1)
    update = torch.full((n,), 1e-3)
    for r in range(rounds):
        barrier.wait()
        t0 = time.perf_counter()
        client.merge(update, round=r, kind="pseudo_grad", version=r)
        results.put((site, r, time.perf_counter() - t0))
    client.close()


def geotrain_loopback(nbytes: int, rounds: int) -> list[float]:
    """Seconds per round (the slower site's merge), two site processes, coordinator in this process."""
    import torch

    from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
    from geotrain.orchestrator.server import create_server

    n = nbytes // 4
    svc = CoordinatorEngine(EngineConfig(sites=("a", "b")))
    svc.params = torch.zeros(n)
    server, port = create_server(svc)
    ctx = mp.get_context("spawn")  # never fork a process that runs gRPC threads
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_site, args=(f"127.0.0.1:{port}", s, n, rounds, barrier, results)) for s in ("a", "b")]
    try:
        for p in procs:
            p.start()
        per_round: dict[int, float] = {}
        for _ in range(2 * rounds):
            site, r, sec = results.get(timeout=600)
            per_round[r] = max(per_round.get(r, 0.0), sec)
        for p in procs:
            p.join(30)
        return [per_round[r] for r in sorted(per_round)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        server.stop(0)


def _gloo(rank: int, port: int, n: int, iters: int, results) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = torch.full((n,), 1e-3)
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        sec = time.perf_counter() - t0
        if rank == 0:
            results.put(sec)
    dist.barrier()
    dist.destroy_process_group()


def gloo_loopback(nbytes: int, iters: int) -> list[float]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_gloo, args=(r, port, nbytes // 4, iters, results)) for r in (0, 1)]
    try:
        for p in procs:
            p.start()
        out = [results.get(timeout=600) for _ in range(iters)]
        for p in procs:
            p.join(30)
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def wire_format_costs(nbytes: int) -> dict:
    """CPU seconds of geotrain's wire format for one payload, in this process (best of 3): encode (one
    CRC32 pass; the chunks' serialization, each copied once into its message's bytes: geotrain.wire.chunks),
    parse (memoryviews of the messages) and decode (one copy into a buffer of the payload's size, one CRC32
    pass), with the values' check of a coordinator (orchestrator.ingest: finite + the norm's sum)."""
    import torch

    from geotrain.orchestrator.ingest import ValueCheck
    from geotrain.wire import transport
    from geotrain.wire.chunks import parse_chunk

    x = torch.full((nbytes // 4,), 1e-3)
    best: dict[str, float] = {}
    for _ in range(3):
        t0 = time.perf_counter()
        stream = transport.Stream(x, kind="params")
        t1 = time.perf_counter()
        wire = list(stream.messages())
        t2 = time.perf_counter()
        parsed = [parse_chunk(w) for w in wire]
        t3 = time.perf_counter()
        transport.decode(iter(parsed), expect_bytes=nbytes)
        t4 = time.perf_counter()
        transport.decode(iter(parsed), expect_bytes=nbytes, inspector=lambda h: ValueCheck())
        t5 = time.perf_counter()
        for key, v in (("crc_s", t1 - t0), ("serialize_s", t2 - t1), ("parse_s", t3 - t2), ("decode_s", t4 - t3),
                       ("decode_checked_s", t5 - t4)):
            best[key] = min(best.get(key, v), round(v, 4))
        del wire, parsed
    return best


def tls_cost(sizes: list[int], link: tuple[float, float], n_merges: int) -> list[dict]:
    """(c): TLS and plaintext merges of each size, on loopback and through the link, in this run."""
    import tempfile

    from geotrain.security.pki import init_certs

    certs = init_certs(tempfile.mkdtemp(prefix="geotrain-bench-certs-"), ("site",), run="bench")
    rows = []
    print(f"(c) TLS / plaintext, the median of {n_merges - 1} warm merges (the first, with the handshake, apart)")
    print(f"{'payload':>10} {'path':>9} {'plain s':>9} {'tls s':>9} {'ratio':>7} {'first plain/tls s':>20}")
    for nbytes in sizes:
        for path, via in (("loopback", None), ("link", link)):
            plain = merges(nbytes, via, n_merges)
            tls = merges(nbytes, via, n_merges, tls=certs)
            p = statistics.median(m["seconds"] for m in plain[1:])
            t = statistics.median(m["seconds"] for m in tls[1:])
            row = {"payload_bytes": nbytes, "path": path, "plaintext_s": round(p, 4), "tls_s": round(t, 4),
                   "ratio": round(t / p, 3), "first_plaintext_s": round(plain[0]["seconds"], 4),
                   "first_tls_s": round(tls[0]["seconds"], 4)}
            if via is not None:
                row["wire_tls_over_plain"] = round((tls[-1]["wire_up"] + tls[-1]["wire_down"]) /
                                                   (plain[-1]["wire_up"] + plain[-1]["wire_down"]), 4)
            rows.append(row)
            print(f"{nbytes / 1e6:>8.3f}MB {path:>9} {p:>9.4f} {t:>9.4f} {t / p:>7.3f} "
                  f"{plain[0]['seconds']:>9.4f}/{tls[0]['seconds']:.4f}"
                  + (f"  wire bytes x{row['wire_tls_over_plain']}" if via is not None else ""))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tls-only", action="store_true", help="run (c) alone")
    ap.add_argument("--no-tls", action="store_true", help="skip (c)")
    ap.add_argument("--tls-merges", type=int, default=4, help="merges per case in (c), the first not counted")
    ap.add_argument("--merges", type=int, default=4, help="merges per case in (a): the first cold, the rest warm")
    ap.add_argument("--bandwidth-mbit", type=float, default=1000.0)
    ap.add_argument("--latency-ms", type=float, default=5.0, help="one way")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds in (b), after one warm-up")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from _common import save

    t_all = time.time()
    bw, lat = args.bandwidth_mbit, args.latency_ms
    rtt = 2 * lat / 1000
    small = demo_payload_bytes()
    if args.tls_only:
        tls_rows = tls_cost([small, BIG], (bw, lat), args.tls_merges)
        path = save("transport_tls", {"link": {"bandwidth_mbit": bw, "latency_ms": lat}, "tls_vs_plaintext": tls_rows,
                                      "loadavg": os.getloadavg(), "seconds": round(time.time() - t_all, 1)})
        print(f"wrote {path} ({time.time() - t_all:.0f} s)")
        return 0
    rows = []
    load_before = os.getloadavg()
    print(f"(a) one merge through the link emulator, {bw:g} Mbit/s, {lat:g} ms one way (RTT {rtt * 1000:g} ms); "
          f"minimum = 1 RTT + up/bw + down/bw (one streaming RPC on an open connection); warm: the median of "
          f"{args.merges - 1} merges after the first")
    print(f"{'payload':>10} {'merge':>5} {'measured s':>11} {'minimum s':>10} {'ratio':>7} {'excess s':>9} "
          f"{'loopback s':>11} {'wire up/down bytes':>22}")
    for nbytes in (small, BIG):
        minimum = rtt + 2 * nbytes * 8 / (bw * 1e6)
        loop = merges(nbytes, None, args.merges)
        linked = merges(nbytes, (bw, lat), args.merges)
        warm = sorted(linked[1:], key=lambda m: m["seconds"])[(len(linked) - 2) // 2]  # the median (lower)
        warm_loop = statistics.median(m["seconds"] for m in loop[1:])
        for which, m, lo in (("cold", linked[0], loop[0]["seconds"]), ("warm", warm, warm_loop)):
            row = {"payload_bytes": nbytes, "merge": which, "measured_s": round(m["seconds"], 4),
                   "minimum_s": round(minimum, 4), "ratio": round(m["seconds"] / minimum, 3),
                   "excess_s": round(m["seconds"] - minimum, 4), "loopback_s": round(lo, 4),
                   "wire_up_bytes": m["wire_up"], "wire_down_bytes": m["wire_down"],
                   "all_s": [round(x["seconds"], 4) for x in linked] if which == "warm" else None}
            rows.append(row)
            print(f"{nbytes / 1e6:>8.3f}MB {which:>5} {row['measured_s']:>11.4f} {row['minimum_s']:>10.4f} "
                  f"{row['ratio']:>7.3f} {row['excess_s']:>9.4f} {row['loopback_s']:>11.4f} "
                  f"{m['wire_up']:>11,}/{m['wire_down']:,}")

    print(f"\n(b) raw throughput on loopback, no emulation, {BIG / 1e6:g} MB float32, 2 sites / 2 ranks "
          f"(median of {args.rounds} after a warm-up)")
    g = geotrain_loopback(BIG, args.rounds + 1)[1:]
    a = gloo_loopback(BIG, args.rounds + 1)[1:]
    g_mbs, a_mbs = BIG / 1e6 / statistics.median(g), BIG / 1e6 / statistics.median(a)
    print(f"geotrain merge via coordinator: {g_mbs:8.1f} MB/s  ({statistics.median(g):.3f} s per merge)")
    print(f"gloo all_reduce:                {a_mbs:8.1f} MB/s  ({statistics.median(a):.3f} s per all_reduce)")
    print(f"ratio geotrain / gloo:          {g_mbs / a_mbs:8.3f}")
    cost = wire_format_costs(BIG)
    print(f"geotrain's wire format, {BIG / 1e6:g} MB, in this process: sender CRC32s {cost['crc_s']:.3f} s + messages "
          f"{cost['serialize_s']:.3f} s; receiver parse {cost['parse_s']:.3f} s + decode {cost['decode_s']:.3f} s "
          f"(with the coordinator's value check {cost['decode_checked_s']:.3f} s)")
    tls_rows = []
    if not args.no_tls:
        print()
        tls_rows = tls_cost([small, BIG], (bw, lat), args.tls_merges)
    big_warm = next(r for r in rows if r["payload_bytes"] == BIG and r["merge"] == "warm")
    big_cold = next(r for r in rows if r["payload_bytes"] == BIG and r["merge"] == "cold")
    from geotrain.wire.crc import IMPLEMENTATION as crc_impl

    print(f"\nratios (issue #14, CRC32 by {crc_impl}): coordinator loopback / gloo all_reduce = {g_mbs / a_mbs:.3f}; "
          f"40 MB merge through {bw:g} Mbit/s, {lat:g} ms / physical minimum = {big_warm['ratio']:.3f} warm "
          f"({big_cold['ratio']:.3f} cold); load average {load_before[0]:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    path = save("transport", {
        "tls_vs_plaintext": tls_rows,
        "link": {"bandwidth_mbit": bw, "latency_ms": lat, "rtt_s": rtt},
        "round_trips_per_merge": 1,
        "minimum_formula": "RTT + payload_up*8/bandwidth + payload_down*8/bandwidth",
        "merge_vs_minimum": rows,
        "loopback_throughput": {"payload_bytes": BIG, "geotrain_merge_s": [round(x, 4) for x in g],
                                "gloo_allreduce_s": [round(x, 4) for x in a], "geotrain_MBps": round(g_mbs, 1),
                                "gloo_MBps": round(a_mbs, 1), "ratio": round(g_mbs / a_mbs, 3),
                                "wire_format_cpu_s": cost},
        "ratios": {"loopback_vs_gloo": round(g_mbs / a_mbs, 3), "merge_40MB_vs_minimum_warm": big_warm["ratio"],
                   "merge_40MB_vs_minimum_cold": big_cold["ratio"]},
        "crc32": crc_impl, "loadavg_start": load_before, "loadavg": os.getloadavg(), "seconds": round(time.time() - t_all, 1)})
    print(f"wrote {path} ({time.time() - t_all:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
