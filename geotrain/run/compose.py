"""``geotrain compose``: render a topology into a Docker Compose deployment, one part per host.

    geotrain compose TOPOLOGY -o DIR [--set path=value ...] [--image NAME] [--offline]
                     [--run-dir HOSTDIR] [--repo DIR]

writes ``DIR/docker-compose.yml`` and ``DIR/topology.yaml`` (the validated topology, overrides
applied). Every part of the run is a service of its own, that is its own host on one
user-defined network (own address, DNS name = service name):

==================  =======================================================================
``etcd``            the control plane (``etcd`` binary of the image, run by ``geotrain.control.serve``),
                    port 2379: with TLS, https and auth as under ``geotrain launch``
``coordinator``     ``geotrain coordinator``, port 7000; ``restart: on-failure`` (it resumes
                    from the state it persisted under ``<run>/coordinator``)
``link-<site>``     ``geotrain link``, one per site whose place differs from ``coordinator.at``:
                    listens on 7100, forwards to ``coordinator:7000`` through the emulated WAN
``site-<name>``     ``geotrain site NAME``: the site's workers, talking to the coordinator
                    through ``link-<name>:7100`` (or ``coordinator:7000`` when co-located)
==================  =======================================================================

Every service has a healthcheck (etcd: ``/health`` and, with TLS, auth enforced; coordinator: the gRPC health
service; link: a TCP connect; site: it has started) and waits for the ones it needs with
``depends_on: condition: service_healthy``, which Compose v1 (``docker-compose`` 1.29) honours
only in file format 2.x, hence ``version: "2.4"``. The network is ``internal``: containers reach
each other and nothing else. No port is published on the host.

All parts share one run directory mounted at ``/run`` (a named volume, or ``--run-dir HOSTDIR``
bind-mounted) so that ``geotrain check`` can read ``metrics.jsonl`` and ``checkpoints/`` after
the run. That suits a test deployment on one machine; on real hosts each part writes its own
volume (see deploy/README.md).

Two kinds of image: the normal one built from ``deploy/Dockerfile`` (``--image``, default
``geotrain:latest``), and ``--offline``: ``geotrain-offline:latest`` from
``scripts/offline-image.sh``, a tiny imported root file system whose containers bind-mount this
machine's ``/usr``, its Python and this checkout (with its virtual environment) read-only, for a
machine with no registry. :func:`render` is pure; :func:`offline_mounts` reads the host.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from geotrain.config.derive import derive
from geotrain.config.topology import Topology
from geotrain.errors import GeotrainError

DEFAULT_IMAGE = "geotrain:latest"
OFFLINE_IMAGE = "geotrain-offline:latest"
COMPOSE_VERSION = "2.4"
ETCD_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_DATA = "/etcd-data"
COORDINATOR_PORT = 7000
LINK_PORT = 7100
RUN_MOUNT = "/run"
TOPOLOGY_MOUNT = "/topology.yaml"
NETWORK = "wan"
RUN_VOLUME = "rundir"
ETCD_VOLUME = "etcd-data"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Healthcheck timings. Compose v1 has no start_interval: the interval is also how long a
# dependent service may wait after its dependency became healthy.
HEALTH_INTERVAL_S = 2.0


@dataclass(frozen=True)
class OfflineMounts:
    """Host paths an offline container bind-mounts read-only at the same path, and the PATH it runs with."""

    paths: tuple[str, ...]
    path_env: str


# ---- the pure part ----------------------------------------------------------------------------


def _py_check(code: str) -> list[str]:
    return ["CMD", "python", "-c", code]


def _tcp_check(port: int) -> list[str]:
    return _py_check(f"import socket; socket.create_connection(('127.0.0.1', {port}), 2).close()")


CERTS_MOUNT = "/certs"


def _grpc_health_check(host: str, port: int, tls: bool = False) -> list[str]:
    """The gRPC health service (grpc.health.v1.Health/Check) says SERVING; with ``tls`` asked with the
    launcher's certificate (the server demands one of the run's on every call)."""
    if tls:
        d = CERTS_MOUNT
        channel = ("r = lambda n: open(n, 'rb').read(); "
                   f"cr = grpc.ssl_channel_credentials(r('{d}/ca.pem'), r('{d}/launcher-key.pem'), r('{d}/launcher.pem')); "
                   f"c = grpc.secure_channel('{host}:{port}', cr, options=[('grpc.ssl_target_name_override', 'coordinator')]); ")
    else:
        channel = f"c = grpc.insecure_channel('{host}:{port}'); "
    return _py_check(
        "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; "
        + channel +
        "r = g.HealthStub(c).Check(h.HealthCheckRequest(service='geotrain.v1.Coordinator'), timeout=3); "
        "sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)")


def link_name(topo: Topology, site: str) -> str:
    """The link's name as the launcher writes it (``us-east<->hub``)."""
    return f"{site}<->{topo.coordinator.at}"


def link_files(topo: Topology, site: str, run_dir: str = RUN_MOUNT) -> tuple[str, str]:
    """(stats file, control file) of a site's link, inside the run directory (as the launcher lays them out)."""
    base = f"{run_dir}/links/{site}--{topo.coordinator.at}"
    return f"{base}.json", f"{base}.control.json"


def site_service(site: str) -> str:
    return f"site-{site}"


def link_service(site: str) -> str:
    return f"link-{site}"


def remote_sites(topo: Topology) -> list[str]:
    """Sites that reach the coordinator over a WAN link (their place differs from coordinator.at)."""
    return [s.name for s in topo.sites if topo.link(s.name, topo.coordinator.at) is not None]


def cert_volumes(certs: str, *names: str) -> tuple[str, ...]:
    """Read-only mounts of the CA certificate and each named part's pair, nothing else (never the CA's key)."""
    files = ["ca.pem"] + [f for n in names for f in (f"{n}.pem", f"{n}-key.pem")]
    return tuple(f"{certs}/{f}:{CERTS_MOUNT}/{f}:ro" for f in files)


def render(topo: Topology, image: str = DEFAULT_IMAGE, *, topology_file: str = "topology.yaml",
           run_dir: str | None = None, offline: OfflineMounts | None = None, data_paths: tuple[str, ...] = (),
           health_interval_s: float = HEALTH_INTERVAL_S, certs: str = "./certs") -> dict:
    """The Compose document (a plain dict, ``version: "2.4"``) deploying ``topo``.

    ``topology_file``: the topology on the host, relative to the compose file or absolute, mounted at
    /topology.yaml. ``run_dir``: a host directory bind-mounted as the shared run directory (default:
    a named volume). ``offline``: bind-mount the host's system, Python and checkout (the offline
    image). ``data_paths``: host files or folders the sites read (``data.source: files``), mounted
    read-only at the same path. ``health_interval_s``: how often healthchecks run (shorter: a faster
    start, more CPU spent on checks). ``certs``: the host directory of the run's certificates
    (geotrain certs init; write_deployment makes them) when security.tls is on: each service mounts
    the CA certificate and its own pair only.
    """
    tls = topo.security.tls
    health = {"interval": f"{int(health_interval_s * 1000)}ms", "timeout": "5s", "retries": 60, "start_period": "2s"}
    run_src = run_dir if run_dir is not None else RUN_VOLUME
    common_volumes = [f"{run_src}:{RUN_MOUNT}", f"{topology_file}:{TOPOLOGY_MOUNT}:ro"]
    environment = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    if offline is not None:
        common_volumes += [f"{p}:{p}:ro" for p in offline.paths]
        environment["PATH"] = offline.path_env
        environment["HOME"] = "/root"

    def service(command: list[str], healthcheck: list[str], depends: list[str], *, volumes: tuple[str, ...] = (),
                **extra) -> dict:
        svc = {
            "image": image,
            "command": command,
            "init": True,  # a real PID 1: signals reach geotrain, zombies are reaped
            "environment": dict(environment),
            "volumes": common_volumes + list(volumes),
            "networks": [NETWORK],
            "healthcheck": {"test": healthcheck, **health},
            "stop_grace_period": "5s",
        }
        if depends:
            svc["depends_on"] = {d: {"condition": "service_healthy"} for d in depends}
        svc.update(extra)
        return svc

    # The run's etcd as `geotrain launch` runs it (geotrain.control.serve): with TLS, https client and peer URLs
    # demanding a certificate of the run's CA, and auth on (each part's certificate name is its etcd user);
    # healthy only once auth is enforced, so no part starts before.
    certs_args = ["--certs", CERTS_MOUNT] if tls else []
    services: dict[str, dict] = {
        "etcd": service(
            ["python", "-m", "geotrain.control.serve", "serve", TOPOLOGY_MOUNT, "--data-dir", f"{ETCD_DATA}/etcd",
             "--listen", "0.0.0.0", "--advertise", "etcd", "--port", str(ETCD_PORT), "--peer-port", str(ETCD_PEER_PORT),
             *certs_args],
            ["CMD", "python", "-m", "geotrain.control.serve", "check", TOPOLOGY_MOUNT,
             "--endpoint", f"127.0.0.1:{ETCD_PORT}", *certs_args], [],
            volumes=(f"{ETCD_VOLUME}:{ETCD_DATA}",) + (cert_volumes(certs, "etcd", "launcher") if tls else ())),
        "coordinator": service(
            ["geotrain", "coordinator", TOPOLOGY_MOUNT, "--run-dir", RUN_MOUNT, "--etcd", f"etcd:{ETCD_PORT}",
             # Bound to its DNS name: that is also the address it advertises in etcd.
             "--bind", f"coordinator:{COORDINATOR_PORT}",
             "--stay",  # serves until `docker-compose down`: a site restarted late still finds it
             *(["--certs", CERTS_MOUNT] if tls else [])],
            # It binds its DNS name, not loopback: ask it there.
            _grpc_health_check("coordinator", COORDINATOR_PORT, tls), ["etcd"], restart="on-failure",
            volumes=cert_volumes(certs, "coordinator", "launcher") if tls else ()),
    }
    links = derive(topo, Path(RUN_MOUNT)).site_links
    for site in remote_sites(topo):
        stats, control = link_files(topo, site)
        argv = ["geotrain", "link", *links[site].args(listen=f"0.0.0.0:{LINK_PORT}", target=f"coordinator:{COORDINATOR_PORT}",
                                                      stats_file=stats, control_file=control)]
        # The stats file lies in the run directory, whose links/ folder may not exist yet.
        shell = f"mkdir -p {RUN_MOUNT}/links && exec " + shlex.join(argv)
        # No dependency: a link connects to its target only when a client connects through it, so
        # it starts beside etcd and the coordinator (the sites wait for both).
        services[link_service(site)] = service(["sh", "-c", shell], _tcp_check(LINK_PORT), [], restart="on-failure")
    remote = set(remote_sites(topo))
    for s in topo.sites:
        via = f"{link_service(s.name)}:{LINK_PORT}" if s.name in remote else f"coordinator:{COORDINATOR_PORT}"
        depends = ["etcd", "coordinator"] + ([link_service(s.name)] if s.name in remote else [])
        started = f"{RUN_MOUNT}/topology.{s.name}.json"
        services[site_service(s.name)] = service(
            ["geotrain", "site", s.name, TOPOLOGY_MOUNT, "--etcd", f"etcd:{ETCD_PORT}", "--coordinator", via,
             "--run-dir", RUN_MOUNT, *(["--certs", CERTS_MOUNT] if tls else [])],
            _py_check(f"import os, sys; sys.exit(0 if os.path.exists({started!r}) else 1)"), depends,
            volumes=tuple(f"{p}:{p}:ro" for p in data_paths)
            + (cert_volumes(certs, f"site.{s.name}") if tls else ()))
    volumes: dict[str, dict] = {ETCD_VOLUME: {}}
    if run_dir is None:
        volumes[RUN_VOLUME] = {}
    return {
        "version": COMPOSE_VERSION,
        "services": services,
        "networks": {NETWORK: {"driver": "bridge", "internal": True}},
        "volumes": volumes,
    }




# ---- reading the host ---------------------------------------------------------------------------


def _repo_root() -> Path:
    """The checkout geotrain runs from (the folder above the geotrain package: this file is geotrain/run/compose.py)."""
    return Path(__file__).resolve().parents[2]


def offline_mounts(repo: Path | None = None) -> OfflineMounts:
    """What an offline container needs from this host: /usr (libraries, etcd), the directories
    /lib, /lib64, /bin where they are not symlinks into /usr (the image holds the same symlinks as
    the host), the Python installation, the virtual environment and the checkout. Never /sbin:
    the engine mounts its init there (PATH has /usr/sbin)."""
    repo = (repo or _repo_root()).resolve()
    candidates = ["/usr"]
    candidates += [d for d in ("/lib", "/lib64", "/bin") if os.path.isdir(d) and not os.path.islink(d)]
    base = Path(os.path.realpath(sys.base_prefix))
    venv = Path(sys.prefix).resolve()
    candidates += [str(base), str(venv), str(repo)]
    paths: list[str] = []
    for c in sorted(set(candidates), key=len):
        if not any(c == p or c.startswith(p.rstrip("/") + "/") for p in paths):
            paths.append(c)
    path_env = f"{venv}/bin:{SYSTEM_PATH}" if venv != base else SYSTEM_PATH
    return OfflineMounts(paths=tuple(paths), path_env=path_env)


def topology_yaml(topo: Topology, source: str) -> str:
    """The validated topology as YAML: field names carry units, so it loads back to the same topology.
    Fields at their defaults are left out, so an image built from another version of geotrain
    (with fields added since) still reads it."""
    header = (f"# Rendered by `geotrain compose` from {source} (overrides applied, validated).\n"
              f"# sha256 of the topology: {topo.digest()}\n")
    return header + yaml.safe_dump(topo.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


def write_deployment(topo: Topology, out_dir: Path, *, source: str = "<topology>", image: str | None = None,
                     offline: bool = False, run_dir: Path | None = None, repo: Path | None = None,
                     health_interval_s: float = HEALTH_INTERVAL_S) -> Path:
    """Write ``docker-compose.yml`` and ``topology.yaml`` into ``out_dir``; return the compose file's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "topology.yaml").write_text(topology_yaml(topo, source))
    if topo.security.tls:  # a fresh CA per deployment unless one is there (rendering again keeps it)
        from geotrain.security.pki import ensure_run_certs

        ensure_run_certs(out_dir / "certs", topo.site_names, topo.name, hosts=("coordinator",))
    data_paths = tuple(str(Path(p).resolve()) for p in topo.data.paths) if topo.data.source == "files" else ()
    doc = render(topo, image or (OFFLINE_IMAGE if offline else DEFAULT_IMAGE), topology_file="./topology.yaml",
                 run_dir=str(run_dir.resolve()) if run_dir is not None else None,
                 offline=offline_mounts(repo) if offline else None, data_paths=data_paths,
                 health_interval_s=health_interval_s)
    path = out_dir / "docker-compose.yml"
    text = (f"# Rendered by `geotrain compose` from {source}: do not edit, render again.\n"
            f"# Run:  docker-compose -f {path} -p {topo.name} up -d\n")
    path.write_text(text + yaml.safe_dump(doc, sort_keys=False, width=1000))
    return path


def main(argv: list[str] | None = None) -> int:
    """``geotrain compose``: 0 when written, 2 on a bad topology or flag."""
    from geotrain.config.topology import load_topology

    p = argparse.ArgumentParser(prog="geotrain compose",
                                description="Render a topology into a Docker Compose deployment (one service per part).")
    p.add_argument("topology", type=Path, help="the topology file (YAML)")
    p.add_argument("-o", "--out", type=Path, required=True, help="directory to write docker-compose.yml and topology.yaml into")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a field, e.g. --set training.rounds=5")
    p.add_argument("--image", default=None, help=f"image of every service (default {DEFAULT_IMAGE}, "
                                                 f"or {OFFLINE_IMAGE} with --offline)")
    p.add_argument("--offline", action="store_true",
                   help="bind-mount this host's /usr, Python and checkout read-only (image from scripts/offline-image.sh)")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="bind-mount this host directory as the shared run directory (default: a named volume)")
    p.add_argument("--repo", type=Path, default=None, help="with --offline: the checkout to mount (default: this one)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        topo = load_topology(args.topology, args.overrides)
        if args.run_dir is not None:
            args.run_dir.mkdir(parents=True, exist_ok=True)
        path = write_deployment(topo, args.out, source=str(args.topology), image=args.image, offline=args.offline,
                                run_dir=args.run_dir, repo=args.repo)
    except GeotrainError as exc:
        print(f"geotrain compose: {exc}", file=sys.stderr)
        return exc.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
