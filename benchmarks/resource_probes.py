"""Does a hostile client leave the coordinator responsive and its memory bounded? (issue #11, item 5)

    .venv/bin/python benchmarks/resource_probes.py [--hold-s 3] [--refused 500]

Starts a real coordinator (``geotrain coordinator topologies/demo.yaml --stay`` with a fresh CA from
``geotrain certs init``, mTLS on, no etcd) as its own process, and attacks it with the certificate of
the demo's site ``us-east`` (a site is the strongest attacker of the threat model: it passes the TLS
handshake). The other site, ``eu-west``, is the honest one. Each probe, in order:

    declared-256MiB x4   4 Merge streams that each declare 256 MiB, send 4 bytes and never end (no model yet:
                         a stream may declare up to 4 GiB)
    negative-size        a Merge whose header declares -1 bytes
    size-2^62            a Merge whose header declares 2^62 bytes
    never-ending x16     16 Merge streams that send their header and nothing more, no client deadline
    site-name-1MiB       Join, GetModel and a Merge header naming a 1 MiB site
    refused-merges       eu-west joins and uploads the demo model (482 KB); then N Merges from us-east for
                         rounds 1..N (each refused FUTURE), each of the model's size

Printed for each: what the attacker's calls ended with, Status latency (the launcher's certificate, the
slowest of the calls made while the probe holds; target < 1 s), an honest call's latency (eu-west's
Join, or GetModel once there is a model), the coordinator's peak RSS minus its idle RSS (VmRSS of its
process, sampled every 20 ms; target < 100 MB), what is left half a second after the probe let go, and the
longest line the probe added to metrics.jsonl.
Held streams are let go (the client cancels) after ``--hold-s``; the server's own deadline
(limits.call_deadline_s, 6 minutes for the demo) is exercised by tests/security/test_server_bounds.py.

Writes benchmarks/results/resource_probes.json. Figures, no assertions.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import grpc  # noqa: E402

from benchmarks._common import REPO, save  # noqa: E402
from geotrain._proto import coordinator_pb2 as pb  # noqa: E402
from geotrain._proto import coordinator_pb2_grpc as pb_grpc  # noqa: E402
from geotrain.security.pki import CertDir, TlsFiles  # noqa: E402
from geotrain.security.tls import secure_channel  # noqa: E402

ATTACKER, HONEST = "us-east", "eu-west"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler:
    """The peak RSS of a process while a block runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb(self.pid))


class Coordinator:
    def __init__(self, work: Path):
        self.certs = work / "certs"
        subprocess.run([sys.executable, "-m", "geotrain.cli", "certs", "init", str(REPO / "topologies" / "demo.yaml"),
                        "-o", str(self.certs)], check=True, capture_output=True, cwd=REPO)
        self.run_dir = work / "run"
        self.proc = subprocess.Popen([sys.executable, "-m", "geotrain.cli", "coordinator",
                                      str(REPO / "topologies" / "demo.yaml"), "--certs", str(self.certs),
                                      "--run-dir", str(self.run_dir), "--bind", "127.0.0.1:0", "--stay"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
        for line in self.proc.stdout:
            if line.startswith("READY"):
                self.address = f"127.0.0.1:{int(line.split()[1])}"
                break
        else:
            raise SystemExit("the coordinator did not start")

    def files(self, name: str) -> TlsFiles:
        return CertDir(self.certs).files(name)

    def stub(self, name: str):
        channel = secure_channel(self.address, self.files(name))
        return pb_grpc.CoordinatorStub(channel), channel

    def metrics_bytes(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        return path.stat().st_size if path.exists() else 0

    def longest_line_since(self, offset: int) -> int:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return 0
        with path.open("rb") as f:
            f.seek(offset)
            return max((len(line) for line in f), default=0)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def header_chunk(site=ATTACKER, declared=0, data=b"", kind="pseudo_grad", round=0):
    return pb.TensorChunk(header=pb.TensorHeader(site=site, round=round, kind=kind, total_bytes=declared, dtype="float32"),
                          offset=0, data=data, crc32=zlib.crc32(data))


def code_of(fn) -> str:
    try:
        fn()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def timed(fn) -> float:
    t0 = time.perf_counter()
    try:
        fn()
    except grpc.RpcError:
        pass
    return time.perf_counter() - t0


def hold_streams(stub, n: int, first, stop: threading.Event) -> tuple[list[threading.Thread], list[str]]:
    """Open ``n`` Merge streams that send ``first`` and then nothing until ``stop``; their codes land in the list."""
    codes: list[str] = []

    def one():
        def msgs():
            yield first
            stop.wait()
        call = stub.Merge(msgs())  # no client deadline
        try:
            for _ in call:
                pass
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    [t.start() for t in threads]
    return threads, codes


def probe(name, coord, launcher, honest, attack, hold_s) -> dict:
    """Run ``attack(stop)`` (it returns what its calls ended with, and holds until ``stop``), measuring meanwhile."""
    idle = rss_mb(coord.proc.pid)
    offset = coord.metrics_bytes()
    stop = threading.Event()
    with Sampler(coord.proc.pid) as sampler:
        result = {}
        worker = threading.Thread(target=lambda: result.update(codes=attack(stop)), daemon=True)
        worker.start()
        time.sleep(min(1.0, hold_s / 3))  # let the probe take hold
        status_s, honest_s = [], []
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline:
            status_s.append(timed(lambda: launcher.Status(pb.StatusRequest(), timeout=30)))
            honest_s.append(timed(honest))
            time.sleep(0.1)
        stop.set()
        worker.join(60)
    time.sleep(0.5)
    after = rss_mb(coord.proc.pid)
    codes = result.get("codes", ["(still running)"])
    summary = {c: codes.count(c) for c in sorted(set(codes))}
    row = {"probe": name, "codes": summary, "status_max_s": round(max(status_s), 4),
           "honest_max_s": round(max(honest_s), 4), "rss_idle_mb": round(idle, 1),
           "rss_over_idle_mb": round(sampler.peak - idle, 1), "rss_after_over_idle_mb": round(after - idle, 1),
           "longest_metrics_line": coord.longest_line_since(offset)}
    print(f"{name:22s} {str(summary):48s} Status {row['status_max_s']*1000:7.1f} ms  honest "
          f"{row['honest_max_s']*1000:7.1f} ms  RSS +{row['rss_over_idle_mb']:6.1f} MB (after +{after - idle:5.1f})  "
          f"longest metrics line {row['longest_metrics_line']} B")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hold-s", type=float, default=3.0)
    ap.add_argument("--refused", type=int, default=500, help="refused Merges for new rounds")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="geotrain-probes-"))
    coord = Coordinator(work)
    try:
        launcher, _ = coord.stub("launcher")
        attacker, _ = coord.stub(f"site.{ATTACKER}")
        honest_stub, _ = coord.stub(f"site.{HONEST}")
        join = lambda: honest_stub.Join(pb.JoinRequest(site=HONEST, workers=1), timeout=30)  # noqa: E731
        time.sleep(1.0)
        print(f"coordinator pid {coord.proc.pid}, idle RSS {rss_mb(coord.proc.pid):.1f} MB, at {coord.address}")
        rows = []

        def streams(n, first):
            def attack(stop):
                threads, codes = hold_streams(attacker, n, first, stop)
                stop.wait()
                [t.join(30) for t in threads]
                return codes
            return attack

        def once(fn):
            def attack(stop):
                codes = fn()
                stop.wait()
                return codes
            return attack

        rows.append(probe("declared-256MiB x4", coord, launcher, join,
                          streams(4, header_chunk(declared=256 << 20, data=b"\0" * 4)), args.hold_s))
        rows.append(probe("negative-size", coord, launcher, join, once(lambda: [code_of(
            lambda: list(attacker.Merge(iter([header_chunk(declared=-1)]), timeout=30)))]), args.hold_s))
        rows.append(probe("size-2^62", coord, launcher, join, once(lambda: [code_of(
            lambda: list(attacker.Merge(iter([header_chunk(declared=2**62)]), timeout=30)))]), args.hold_s))
        rows.append(probe("never-ending x16", coord, launcher, join,
                          streams(16, header_chunk(declared=4 << 20)), args.hold_s))
        huge = "x" * (1 << 20)
        rows.append(probe("site-name-1MiB", coord, launcher, join, once(lambda: [
            code_of(lambda: attacker.Join(pb.JoinRequest(site=huge, workers=1), timeout=30)),
            code_of(lambda: list(attacker.GetModel(pb.GetModelRequest(site=huge), timeout=30))),
            code_of(lambda: list(attacker.Merge(iter([header_chunk(site=huge, declared=4, data=b"\0" * 4)]),
                                                timeout=30)))]), args.hold_s))

        # the honest site provides the model; the attacker is a member too, and sends updates for rounds ahead
        import torch

        from geotrain.wire import transport
        from geotrain.worker.client import CoordinatorClient
        from geotrain.worker.model import GPTConfig, build_model

        model = build_model(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64), seed=0)
        flat = transport.flatten(model.parameters())
        honest = CoordinatorClient(coord.address, HONEST, tls=coord.files(f"site.{HONEST}"), timeout_s=60)
        honest.join(1)
        honest.init_model(flat)
        attacker.Join(pb.JoinRequest(site=ATTACKER, workers=1), timeout=30)
        fetch = lambda: honest.get_model(0)  # noqa: E731
        update = torch.zeros_like(flat)

        def refused(stop):
            codes = []
            for rnd in range(1, args.refused + 1):
                if stop.is_set():
                    break
                codes.append(code_of(lambda: list(attacker.Merge(transport.encode(update, site=ATTACKER, round=rnd,
                                                                                  kind="pseudo_grad"), timeout=30))))
            return codes

        rows.append(probe(f"refused-merges x{args.refused}", coord, launcher, fetch, refused,
                          max(args.hold_s, 10.0)))
        rows.append(probe("16 never-ending + model", coord, launcher, fetch,
                          streams(16, header_chunk(declared=len(flat) * 4)), args.hold_s))
        path = save("resource_probes", {"hold_s": args.hold_s, "probes": rows})
        print(f"wrote {path.relative_to(REPO)}")
    finally:
        coord.stop()


if __name__ == "__main__":
    main()
