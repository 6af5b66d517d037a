"""etcd with mutual TLS and auth (issue #11): a real etcd, the run's certificates, each part as its certificate.

The etcd the launcher starts (EtcdServer(tls=..., auth=grants(...))) refuses a client without a
certificate and one of another CA at the TLS handshake; with auth on, a certificate's common name is
its etcd user (geotrain.control.auth): the coordinator writes its keys, a site only its members, the
launcher nothing — each other write is PERMISSION_DENIED.
"""

from __future__ import annotations

import json
import uuid

import grpc
import pyetcd
import pytest

from geotrain.control.auth import check_enforced, grants
from geotrain.control.etcd_client import ETCD_ERRORS, permission_denied
from geotrain.control.etcd_server import EtcdServer, ServerTls
from geotrain.control.plane import ControlPlane, find_etcd
from geotrain.errors import ControlPlaneError
from geotrain.security.pki import COORDINATOR, ETCD, LAUNCHER, TlsFiles, init_certs, site_name

try:
    find_etcd()
except ControlPlaneError:  # pragma: no cover - the image installs etcd
    pytest.skip("no etcd binary", allow_module_level=True)

RUN = "sec"
SITES = ("a", "b")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    base = tmp_path_factory.mktemp("etcd-pki")
    return init_certs(base / "certs", SITES, run=RUN), init_certs(base / "other", SITES, run="another")


@pytest.fixture(scope="module")
def etcd(pki, tmp_path_factory):
    certs, _ = pki
    base = tmp_path_factory.mktemp("etcd-tls")
    server = EtcdServer(base / "data", log_path=base / "etcd.log",
                        tls=ServerTls(certs.files(ETCD), certs.files(LAUNCHER)), auth=grants(RUN, SITES), run=RUN)
    server.start()
    yield server
    server.stop()


def part(etcd, pki, name: str) -> ControlPlane:
    certs, _ = pki
    return ControlPlane.for_part(f"127.0.0.1:{etcd.client_port}", RUN, name, certs_dir=certs.path, timeout_s=2.0)


def refused_for_permission(exc: ControlPlaneError) -> bool:
    return isinstance(exc.__cause__, ETCD_ERRORS) and permission_denied(exc.__cause__)


def test_the_server_runs_https_with_client_and_peer_certificates(etcd, pki):
    assert etcd.endpoint.startswith("https://")
    argv = etcd.process.args
    for flag in ("--client-cert-auth", "--peer-client-cert-auth", "--cert-file", "--trusted-ca-file",
                 "--peer-cert-file", "--peer-trusted-ca-file"):
        assert flag in argv
    assert all(u.startswith("https://") for u in (argv[argv.index("--listen-client-urls") + 1],
                                                   argv[argv.index("--listen-peer-urls") + 1]))
    assert etcd.auth_outcome == "enabled"


def test_a_client_without_credentials_is_refused(etcd, pki):
    certs, _ = pki
    # Plaintext to a TLS port: no handshake at all.
    with ControlPlane(f"127.0.0.1:{etcd.client_port}", RUN, timeout_s=2.0) as plain:
        with pytest.raises(ControlPlaneError, match="UNAVAILABLE"):
            plain.get_json("coordinator")
    # TLS that trusts the run's CA but presents no certificate: etcd demands one (--client-cert-auth).
    creds = grpc.ssl_channel_credentials(root_certificates=certs.files(LAUNCHER).read()[0])
    ep = pyetcd.Endpoint("127.0.0.1", etcd.client_port, secure=True, creds=creds, time_retry=0.0,
                         opts=[("grpc.ssl_target_name_override", ETCD)])
    with pyetcd.MultiEndpointEtcd3Client(endpoints=[ep], timeout=2.0) as anonymous:
        with pytest.raises(ETCD_ERRORS):
            anonymous.get(f"/geotrain/{RUN}/coordinator")


def test_a_certificate_of_another_ca_is_refused(etcd, pki):
    certs, other = pki
    theirs = other.files(COORDINATOR)  # named "coordinator", but signed by another CA
    files = TlsFiles(ca=certs.files(LAUNCHER).ca, cert=theirs.cert, key=theirs.key, name="coordinator (other CA)")
    with ControlPlane(f"127.0.0.1:{etcd.client_port}", RUN, timeout_s=2.0, tls=files, server_name=ETCD) as cp:
        with pytest.raises(ControlPlaneError, match="UNAVAILABLE") as info:
            cp.put_state({"round": 99})
        assert not refused_for_permission(info.value)  # refused at the handshake, before any user is looked up


def test_the_coordinator_writes_the_coordinators_keys(etcd, pki):
    with part(etcd, pki, COORDINATOR) as coord:
        reg = coord.set_coordinator("127.0.0.1:7000", ttl_s=3.0)
        epoch = reg.info["epoch"]
        assert coord.coordinator()["address"] == "127.0.0.1:7000"
        assert coord.put_state_fenced({"round": 1, "version": 1, "epoch": epoch}, epoch)
        assert coord.get_state()["round"] == 1
        reg.close()


def test_a_site_cannot_write_the_coordinators_keys(etcd, pki):
    with part(etcd, pki, COORDINATOR) as coord, part(etcd, pki, site_name("a")) as site:
        reg = coord.set_coordinator("127.0.0.1:7000", ttl_s=3.0)
        epoch = reg.info["epoch"]
        assert site.coordinator_address() == "127.0.0.1:7000"  # it reads what it needs
        attempts = {
            "bump coordinator_epoch": site._next_epoch,
            "publish the run state": lambda: site.put_state_fenced({"round": 999}, epoch),
            "announce itself as coordinator": lambda: site.set_coordinator("127.0.0.1:6666"),
            "delete the coordinator's key": lambda: site.delete("coordinator"),
            "put the state": lambda: site.put_state({"round": 999}),
        }
        for what, attempt in attempts.items():
            with pytest.raises(ControlPlaneError, match="PERMISSION_DENIED") as info:
                attempt()
            assert refused_for_permission(info.value), what
            assert "site.a" in str(info.value)
        # Nor can it revoke the coordinator's lease (etcd checks write permission on the lease's keys).
        with pytest.raises(ETCD_ERRORS) as info:
            site._client.revoke_lease(reg.lease_id)
        assert permission_denied(info.value)
        # What etcd 3.4 does NOT check (docs/security.md): keeping any lease alive needs no permission.
        assert next(iter(site._client.refresh_lease(reg.lease_id))).TTL > 0
        with part(etcd, pki, LAUNCHER) as launcher:
            assert launcher.coordinator()["epoch"] == epoch
            raw, _ = launcher._client.get(f"/geotrain/{RUN}/coordinator_epoch")
            assert int(raw) == epoch  # unchanged by every attempt above
        reg.close()


def test_a_site_registers_its_own_members_only(etcd, pki):
    with part(etcd, pki, site_name("a")) as site, part(etcd, pki, COORDINATOR) as coord:
        reg = site.register_member("a", 0, {"pid": 1}, ttl_s=3.0)
        assert coord.members()["a"] == {0: {"pid": 1}}
        with pytest.raises(ControlPlaneError, match="PERMISSION_DENIED"):
            site.register_member("b", 0, {"pid": 2})
        reg.close()  # revoking its own lease is allowed
        assert "a" not in coord.members()


def test_the_launcher_reads_and_writes_nothing(etcd, pki):
    with part(etcd, pki, LAUNCHER) as launcher:
        launcher.coordinator()  # reading is allowed
        with pytest.raises(ControlPlaneError, match="PERMISSION_DENIED"):
            launcher.put_json("coordinator", {"address": "evil:1"})
        check_enforced(launcher._client, RUN)  # the checker's own good case


def test_a_certificate_of_the_run_that_is_no_user_is_refused(etcd, pki):
    """etcd's own certificate (same CA, no etcd user of that name) may not even read."""
    with part(etcd, pki, ETCD) as stranger:
        with pytest.raises(ControlPlaneError, match="PERMISSION_DENIED"):
            stranger.coordinator()


def test_a_coordinator_of_another_run_on_the_same_etcd_writes_nothing_of_this_run(etcd, pki):
    with part(etcd, pki, COORDINATOR) as coord:
        other = ControlPlane(coord.endpoint, "another-run", tls=coord._tls, server_name=ETCD, timeout_s=2.0)
        with other, pytest.raises(ControlPlaneError, match="PERMISSION_DENIED"):
            other.put_state({"round": 1})


def test_restarting_finds_auth_on(etcd, pki):
    etcd.stop()
    etcd.start()
    assert etcd.auth_outcome == "already enabled"
    with part(etcd, pki, site_name("b")) as site, pytest.raises(ControlPlaneError, match="PERMISSION_DENIED"):
        site.put_state({"round": 1})


def test_the_enforcement_check_fails_on_an_etcd_without_auth(pki, tmp_path):
    certs, _ = pki
    server = EtcdServer(tmp_path / "data", tls=ServerTls(certs.files(ETCD), certs.files(LAUNCHER)))
    with server:
        client = server.client(2.0)
        try:
            with pytest.raises(ControlPlaneError, match="not enforced"):
                check_enforced(client, f"r-{uuid.uuid4().hex[:6]}")
        finally:
            client.close()


def test_an_external_etcd_is_reached_with_the_topologys_files(pki, tmp_path):
    """etcd.endpoint + etcd.ca_file/cert_file/key_file: every part presents that pair, the server checked by the
    address dialled (here 127.0.0.1, in its certificate); the same etcd without the files is plaintext and fails."""
    from geotrain.config.schema import EtcdConfig

    certs, _ = pki
    server = EtcdServer(tmp_path / "data", tls=ServerTls(certs.files(ETCD), certs.files(LAUNCHER)))
    with server:
        pair = certs.files(LAUNCHER)
        ext = EtcdConfig(endpoint=f"127.0.0.1:{server.client_port}", ca_file=str(pair.ca), cert_file=str(pair.cert),
                         key_file=str(pair.key))
        with ControlPlane.for_part(None, "ext", COORDINATOR, certs_dir=certs.path, etcd=ext, timeout_s=2.0) as cp:
            assert cp._server_name is None and cp.endpoint.startswith("https://")
            cp.put_state({"round": 1})
            assert cp.get_state() == {"round": 1}
        plain = EtcdConfig(endpoint=f"127.0.0.1:{server.client_port}")
        with ControlPlane.for_part(None, "ext", COORDINATOR, certs_dir=certs.path, etcd=plain, timeout_s=2.0) as cp:
            with pytest.raises(ControlPlaneError, match="UNAVAILABLE"):
                cp.get_state()


WORKER = """
import json, sys
from geotrain.worker import context
ctx = context.init()
json.dump({"coordinator": ctx.coordinator, "alive": context._registration.alive,
           "as": context._registration._cp.identity}, open(sys.argv[1], "w"))
"""


def test_geotrain_site_finds_the_coordinator_and_its_workers_register_as_the_site(etcd, pki, tmp_path):
    """The real code paths: run_site's lookup of the coordinator and worker.context.init's registration, each
    with the site's certificate over TLS (a refused one would fail the worker)."""
    import sys

    from geotrain.config.topology import parse_topology
    from geotrain.run.site import run_site

    certs, _ = pki
    topo = parse_topology({"name": RUN, "sites": [{"name": s, "workers": 1} for s in SITES],
                           "security": {"certs": str(certs.path)}})
    with part(etcd, pki, COORDINATOR) as coord:
        reg = coord.set_coordinator("127.0.0.1:7123", ttl_s=3.0)
        out = tmp_path / "seen.json"
        code = run_site(topo, "b", tmp_path / "run", etcd=f"127.0.0.1:{etcd.client_port}", coordinator=None,
                        script=[sys.executable, "-c", WORKER, str(out)], certs=certs.path)
        assert code == 0, (tmp_path / "run" / "logs" / "worker-b-0.log").read_text()[-2000:]
        assert json.loads(out.read_text()) == {"coordinator": "127.0.0.1:7123", "alive": True, "as": "site.b"}
        reg.close()


@pytest.mark.slow
def test_launch_runs_its_etcd_with_tls_and_auth(tmp_path, repo):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "geotrain.cli", "launch", str(repo / "topologies" / "demo.yaml"),
                           "--set", "training.rounds=2", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    started = [e for e in events if e.get("event") == "process_started" and e.get("role") == "etcd"]
    assert started and all(e["endpoint"].startswith("https://") for e in started)
    log = (run_dir / "logs" / "etcd.log").read_text()
    assert "client-cert-auth = true" in log and "enabled authentication" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["security"]["tls"] is True
    for log_file in (run_dir / "logs").glob("*.log"):  # no part was refused by etcd
        assert "PERMISSION_DENIED" not in log_file.read_text(errors="replace"), log_file.name


def test_compose_runs_its_etcd_with_tls_auth_and_a_check_that_waits_for_auth(tmp_path, repo):
    """The Compose etcd service's own command and healthcheck, run here with the container paths mapped to
    folders (no Docker needed): https, auth on, check 0; the same check against an etcd without auth says 1."""
    import socket
    import subprocess
    import sys

    from geotrain.config.topology import load_topology
    from geotrain.run.compose import CERTS_MOUNT, ETCD_DATA, TOPOLOGY_MOUNT, render

    topo = load_topology(repo / "topologies" / "demo.yaml", [])
    svc = render(topo)["services"]["etcd"]
    mounts = [v.split(":")[0].split("/")[-1] for v in svc["volumes"] if CERTS_MOUNT in v]
    assert sorted(mounts) == ["ca.pem", "etcd-key.pem", "etcd.pem", "launcher-key.pem", "launcher.pem"]  # no CA key
    certs = init_certs(tmp_path / "certs", topo.site_names, run=topo.name)
    (tmp_path / "topology.json").write_text(json.dumps(topo.model_dump(mode="json")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def here(argv):
        out = []
        for a in argv[1:]:  # argv[0] is the image's python
            a = a.replace(TOPOLOGY_MOUNT, str(tmp_path / "topology.json")).replace(CERTS_MOUNT, str(certs.path))
            a = a.replace(ETCD_DATA, str(tmp_path / "etcd-data")).replace("0.0.0.0", "127.0.0.1")
            out.append(str(port) if a == "2379" else a.replace(":2379", f":{port}"))
        return [sys.executable, *out]

    check = here(svc["healthcheck"]["test"][1:])
    serve = subprocess.Popen(here(svc["command"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo)
    try:
        line = serve.stdout.readline()
        assert line.startswith("READY https://"), line + serve.stderr.read()
        done = subprocess.run(check, capture_output=True, text=True, timeout=60, cwd=repo)
        assert done.returncode == 0, done.stderr
    finally:
        serve.terminate()
        serve.wait(timeout=15)
    assert serve.returncode == 0
    # The check's bad case: an etcd with the run's TLS but no auth is not healthy for Compose.
    with EtcdServer(tmp_path / "noauth", client_port=port,
                    tls=ServerTls(certs.files(ETCD), certs.files(LAUNCHER))):
        done = subprocess.run(check, capture_output=True, text=True, timeout=60, cwd=repo)
        assert done.returncode == 1 and "not enforced" in done.stderr
