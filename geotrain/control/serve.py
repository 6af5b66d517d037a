"""An etcd of one run as a process of its own, and a check that it is safe to use (Compose, separate hosts).

    python -m geotrain.control.serve serve TOPOLOGY --data-dir DIR [--certs DIR] [--listen HOST]
                                     [--advertise HOST] [--port 2379] [--peer-port 2380]
    python -m geotrain.control.serve check TOPOLOGY --endpoint HOST:PORT [--certs DIR]

``serve`` runs :class:`~geotrain.control.etcd_server.EtcdServer` as ``geotrain launch`` does: with the run's
certificates (``--certs``, default ``security.certs``) mutual TLS on its client and peer URLs and auth on
(geotrain.control.auth: only the coordinator's certificate writes the coordinator's keys); plaintext when
``security.tls`` is false. It prints ``READY <endpoint>`` once etcd is healthy and auth enabled, and stops etcd
on SIGTERM/SIGINT. ``check`` exits 0 when etcd answers ``/health`` and — with TLS — refuses the launcher's
write (auth enforced), else 1 with the reason: a Compose healthcheck that lets no part start before auth is on.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from geotrain.errors import GeotrainError


def _certs(topo, given: Path | None):
    from geotrain.security.pki import CertDir

    if not topo.security.tls:
        return None
    where = given or (Path(topo.security.certs) if topo.security.certs else None)
    if where is None:
        raise GeotrainError("security.tls is on but no certificates were given: --certs DIR (geotrain certs init)")
    return CertDir(where)


def _server(topo, certs, data_dir: Path, host: str, advertise: str | None, port: int = 0, peer_port: int = 0,
            log_path: Path | None = None):
    from geotrain.control.auth import grants
    from geotrain.control.etcd_server import EtcdServer, ServerTls
    from geotrain.security.pki import ETCD, LAUNCHER

    tls = ServerTls(certs.files(ETCD), certs.files(LAUNCHER)) if certs is not None else None
    return EtcdServer(data_dir, host=host, client_port=port, peer_port=peer_port, tls=tls, run=topo.name,
                      auth=grants(topo.name, topo.site_names) if tls is not None else None, advertise_host=advertise,
                      log_path=log_path)


def check(topo, certs, endpoint: str) -> str | None:
    """None when etcd at ``endpoint`` is healthy (and, with ``certs``, enforces auth); else why not."""
    from geotrain.control.auth import check_enforced
    from geotrain.control.etcd_client import parse_endpoint

    host, port = parse_endpoint(endpoint)
    # Only its health probe and its client are used: no data dir is touched, no process started.
    server = _server(topo, certs, Path("/nonexistent"), host, None, port)
    if not server._healthy():
        return f"etcd at {endpoint} is not healthy"
    if certs is None:
        return None
    client = server.client(3.0)
    try:
        check_enforced(client, topo.name, 3.0)
    except GeotrainError as exc:
        return str(exc)
    finally:
        client.close()
    return None


def main(argv: list[str] | None = None) -> int:
    from geotrain.config.topology import load_any

    p = argparse.ArgumentParser(prog="python -m geotrain.control.serve", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("serve", help="run the run's etcd (TLS and auth from the run's certificates)")
    sp.add_argument("topology")
    sp.add_argument("--data-dir", type=Path, required=True)
    sp.add_argument("--certs", type=Path, default=None)
    sp.add_argument("--listen", default="127.0.0.1", help="address to listen on (client and peer URLs)")
    sp.add_argument("--advertise", default=None, help="name given to clients (default: --listen)")
    sp.add_argument("--port", type=int, default=0, help="client port (default: a free one)")
    sp.add_argument("--peer-port", type=int, default=0, help="peer port (default: a free one)")
    cp = sub.add_parser("check", help="exit 0 if etcd is healthy and enforces auth")
    cp.add_argument("topology")
    cp.add_argument("--endpoint", required=True)
    cp.add_argument("--certs", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        topo = load_any(args.topology)
        certs = _certs(topo, args.certs)
        if args.command == "check":
            problem = check(topo, certs, args.endpoint)
            if problem:
                print(problem, file=sys.stderr)
            return 1 if problem else 0
        # etcd's own log beside its data dir (DIR.log), where a restarted container finds it again.
        server = _server(topo, certs, args.data_dir, args.listen, args.advertise, args.port, args.peer_port,
                         log_path=args.data_dir.with_name(args.data_dir.name + ".log"))
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        endpoint = server.start(timeout_s=60.0)
        print(f"READY {endpoint}", flush=True)
        while not stop.wait(0.5):
            if not server.running():
                print(f"etcd exited with status {server.process.poll()}", file=sys.stderr)
                return 1
        server.stop()
        return 0
    except GeotrainError as exc:
        print(f"geotrain etcd: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
