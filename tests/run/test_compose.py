"""`geotrain compose`: the deployment is rendered from the topology (no Docker needed, except for
the last test, which asks `docker-compose config` to accept the file when docker-compose exists)."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml

import geotrain

from geotrain.run.compose import (
    COMPOSE_VERSION,
    OfflineMounts,
    link_service,
    main,
    offline_mounts,
    remote_sites,
    render,
    site_service,
)
from geotrain.config.topology import load_topology, parse_topology

DEMO_SITES = ["us-east", "eu-west"]


def topo_of(sites, at="hub", **extra):
    return parse_topology({"name": "t", "sites": [{"name": s, "workers": 1} for s in sites], "coordinator": {"at": at},
                           **extra})


@pytest.fixture
def demo(repo):
    return load_topology(repo / "topologies" / "demo.yaml")


def test_every_part_is_a_service(demo):
    doc = render(demo)
    assert doc["version"] == COMPOSE_VERSION == "2.4"  # Compose v1 honours service_healthy only in 2.x
    expected = {"etcd", "coordinator"} | {site_service(s) for s in DEMO_SITES} | {link_service(s) for s in DEMO_SITES}
    assert set(doc["services"]) == expected


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies(demo):
    services = render(demo)["services"]
    for name, svc in services.items():
        assert svc["healthcheck"]["test"][0] == "CMD", name
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            assert cond == {"condition": "service_healthy"}, (name, dep)
    assert set(services["coordinator"]["depends_on"]) == {"etcd"}
    for s in DEMO_SITES:
        assert set(services[site_service(s)]["depends_on"]) == {"etcd", "coordinator", link_service(s)}


def test_sites_reach_the_coordinator_through_their_own_link(demo):
    services = render(demo)["services"]
    for s in DEMO_SITES:
        cmd = services[site_service(s)]["command"]
        assert cmd[:3] == ["geotrain", "site", s]
        assert cmd[cmd.index("--coordinator") + 1] == f"{link_service(s)}:7100"
        assert cmd[cmd.index("--etcd") + 1] == "etcd:2379"
        link_cmd = " ".join(services[link_service(s)]["command"])
        assert "--target coordinator:7000" in link_cmd and "--latency 25ms" in link_cmd and "--bandwidth 100mbit" in link_cmd
        assert f"/run/links/{s}--hub.control.json" in link_cmd


def test_services_come_from_the_topology_not_from_a_template():
    three = topo_of(["a", "b", "c"])
    services = render(three)["services"]
    assert sorted(k for k in services if k.startswith("site-")) == ["site-a", "site-b", "site-c"]
    assert sorted(k for k in services if k.startswith("link-")) == ["link-a", "link-b", "link-c"]
    one = render(topo_of(["solo"]))["services"]
    assert set(one) == {"etcd", "coordinator", "site-solo", "link-solo"}


def test_a_site_in_the_coordinators_datacenter_has_no_link():
    topo = topo_of(["a", "b", "c"], at="b")
    assert remote_sites(topo) == ["a", "c"]
    services = render(topo)["services"]
    assert "link-b" not in services and {"link-a", "link-c"} <= set(services)
    cmd = services["site-b"]["command"]
    assert cmd[cmd.index("--coordinator") + 1] == "coordinator:7000"
    assert "link-b" not in services["site-b"]["depends_on"]


def test_per_pair_link_parameters_are_rendered():
    topo = topo_of(["a", "b"], links={"default": {"bandwidth": "1gbit", "latency": "5ms"},
                                      "pairs": [{"between": ["a", "hub"], "bandwidth": "10mbit", "latency": "80ms",
                                                 "loss": 0.01}]})
    services = render(topo)["services"]
    a, b = " ".join(services["link-a"]["command"]), " ".join(services["link-b"]["command"])
    assert "--bandwidth 10mbit --latency 80ms" in a and "--loss 0.01" in a
    assert "--bandwidth 1000mbit --latency 5ms" in b


def test_one_internal_network_no_published_ports_shared_run_dir(demo):
    doc = render(demo)
    assert doc["networks"] == {"wan": {"driver": "bridge", "internal": True}}
    for name, svc in doc["services"].items():
        assert svc["networks"] == ["wan"], name
        assert "ports" not in svc, name
        assert "rundir:/run" in svc["volumes"] and "topology.yaml:/topology.yaml:ro" in svc["volumes"], name
    assert "rundir" in doc["volumes"]
    assert doc["services"]["coordinator"]["restart"] == "on-failure"
    bound = render(demo, run_dir="/srv/run")
    assert "rundir" not in bound["volumes"]
    assert all("/srv/run:/run" in svc["volumes"] for svc in bound["services"].values())


def test_offline_mounts_are_read_only_and_put_the_venv_on_path(demo):
    mounts = OfflineMounts(paths=("/usr", "/opt/py", "/src/repo"), path_env="/src/repo/.venv/bin:/usr/bin")
    doc = render(demo, "geotrain-offline:latest", offline=mounts)
    for svc in doc["services"].values():
        assert svc["image"] == "geotrain-offline:latest"
        for p in mounts.paths:
            assert f"{p}:{p}:ro" in svc["volumes"]
        assert svc["environment"]["PATH"] == mounts.path_env


def test_offline_mounts_of_this_host_cover_python_and_checkout(repo):
    m = offline_mounts(repo)
    assert "/usr" in m.paths
    assert "/sbin" not in m.paths  # the engine mounts its init at /sbin/docker-init
    assert any(str(repo.resolve()).startswith(p) for p in m.paths)
    python_home = os.path.realpath(sys.base_prefix)
    assert any(python_home == p or python_home.startswith(p + "/") for p in m.paths), m.paths
    # no path is mounted twice (nested under another)
    for a in m.paths:
        assert not any(a != b and a.startswith(b.rstrip("/") + "/") for b in m.paths), m.paths


def test_default_offline_mounts_cover_every_folder_geotrain_imports_from():
    """Without --repo, the checkout is found from the installed package: the mounts must cover the
    folders of geotrain, geotrain.orchestrator and geotrain.worker (orchestrator/ and worker/ sit
    beside geotrain/, not inside it). A container missing one fails with ModuleNotFoundError."""
    import geotrain.orchestrator
    import geotrain.worker

    m = offline_mounts()
    for pkg in (geotrain, geotrain.orchestrator, geotrain.worker):
        folder = os.path.dirname(os.path.realpath(pkg.__file__))
        assert any(folder == p or folder.startswith(p.rstrip("/") + "/") for p in m.paths), (pkg.__name__, m.paths)


def test_cli_writes_a_loadable_topology_with_overrides(repo, tmp_path, capsys):
    out = tmp_path / "deploy"
    rc = main([str(repo / "topologies" / "demo.yaml"), "-o", str(out), "--set", "training.rounds=3",
               "--set", "sites[0].workers=1"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(out / "docker-compose.yml")
    topo = load_topology(out / "topology.yaml")
    assert topo.training.rounds == 3 and topo.sites[0].workers == 1
    assert topo.digest() == load_topology(repo / "topologies" / "demo.yaml",
                                          ["training.rounds=3", "sites[0].workers=1"]).digest()
    assert "recovery" not in yaml.safe_load((out / "topology.yaml").read_text())  # defaults left out
    doc = yaml.safe_load((out / "docker-compose.yml").read_text())
    assert set(doc["services"]) >= {"etcd", "coordinator", "site-us-east", "site-eu-west"}


def test_cli_bad_topology_is_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsites: []\n")
    assert main([str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "geotrain compose:" in capsys.readouterr().err


def test_docker_compose_accepts_the_rendered_file(repo, tmp_path):
    out = tmp_path / "deploy"
    assert main([str(repo / "topologies" / "demo.yaml"), "-o", str(out)]) == 0
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (scripts/docker-engine.sh installs it)")
    r = subprocess.run(["docker-compose", "-f", str(out / "docker-compose.yml"), "config", "-q"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_tls_mounts_the_ca_and_each_parts_own_pair_only(demo, tmp_path):
    from geotrain.run.compose import write_deployment

    doc = render(demo)
    coord = doc["services"]["coordinator"]
    assert coord["command"][-2:] == ["--certs", "/certs"]
    mounted = {v.split(":")[1] for v in coord["volumes"] if ":/certs/" in v}
    assert mounted == {"/certs/ca.pem", "/certs/coordinator.pem", "/certs/coordinator-key.pem", "/certs/launcher.pem",
                       "/certs/launcher-key.pem"}
    assert "ssl_channel_credentials" in " ".join(coord["healthcheck"]["test"])
    site = doc["services"][site_service("us-east")]
    assert "--certs" in site["command"]
    assert {v.split(":")[1] for v in site["volumes"] if ":/certs/" in v} == {
        "/certs/ca.pem", "/certs/site.us-east.pem", "/certs/site.us-east-key.pem"}
    assert not any("ca-key" in v for s in doc["services"].values() for v in s.get("volumes", []))
    write_deployment(demo, tmp_path / "out")
    assert (tmp_path / "out" / "certs" / "site.eu-west-key.pem").stat().st_mode & 0o777 == 0o600
    plain = render(demo.model_copy(update={"security": demo.security.model_copy(update={"tls": False})}))
    assert "--certs" not in plain["services"]["coordinator"]["command"]
