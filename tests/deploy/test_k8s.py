"""`geotrain k8s render`: every object validates against the Kubernetes API schemas offline
(kubernetes-validate, strict: unknown fields refused), and the content follows the topology: a Job per
site, its link emulator beside it, Secrets with the CA and the part's own pair, NetworkPolicies that
let through exactly the paths the topology draws. No cluster is involved."""

import base64
import copy
import socket
import stat
import subprocess
import sys

import kubernetes_validate  # a dev dependency: missing, this module fails to import (an error, not a skip)
import pytest
import yaml

from geotrain.config.topology import load_topology, parse_topology
from geotrain.run import compose
from geotrain.run.k8s import (
    COORDINATOR_PORT,
    ETCD_PORT,
    LINK_PORT,
    MIN_KUBERNETES,
    RENDEZVOUS_PORT,
    RenderError,
    load_rendered,
    main,
    render,
    master_addr,
    site_part,
    topology_yaml,
    wait_for,
    write_deployment,
)
from tests.deploy.netpol import OTHER_PORT, allowed_paths

VERSIONS = (MIN_KUBERNETES, kubernetes_validate.latest_version())


def topo_of(sites, at="hub", **extra):
    return parse_topology({"name": "t", "sites": [{"name": s, "workers": 1} for s in sites],
                           "coordinator": {"at": at}, **extra})


@pytest.fixture
def demo(repo):
    return load_topology(repo / "topologies" / "demo.yaml")


@pytest.fixture
def three(repo):
    return load_topology(repo / "topologies" / "three-continents.yaml")


def rendered(topo, tmp_path, **kw):
    out = tmp_path / "k8s"
    write_deployment(topo, out, **kw)
    return load_rendered(out)


def by(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


def one(objects, kind, name):
    found = by(objects, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def pod_spec(objects, kind, name):
    return one(objects, kind, name)["spec"]["template"]["spec"]


def container(spec, name):
    (c,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    return c


def flag(argv, name):
    return argv[argv.index(name) + 1]


def validate_all(objects):
    """Every object against each version's schema; the errors, by object."""
    errors = []
    for o in objects:
        for v in VERSIONS:
            try:
                kubernetes_validate.validate(o, v, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{o['kind']}/{o['metadata']['name']} ({v}): {exc}")
    return errors


# ---- schemas ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo.yaml", "three-continents.yaml", "demo-ddp.yaml"])
@pytest.mark.parametrize("tls", [True, False])
def test_every_rendered_object_validates_against_the_kubernetes_schemas(repo, tmp_path, name, tls):
    topo = load_topology(repo / "topologies" / name, [f"security.tls={str(tls).lower()}"])
    objects = rendered(topo, tmp_path)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ConfigMap", "Service", "StatefulSet", "Deployment", "Job", "PersistentVolumeClaim",
            "NetworkPolicy"} <= kinds
    assert ("Secret" in kinds) == tls
    assert validate_all(objects) == []


def broken(objects, kind, change):
    out = copy.deepcopy(objects)
    change(next(o for o in out if o["kind"] == kind))
    return out


@pytest.mark.parametrize("kind, change", [
    ("Job", lambda o: o["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always")),  # unknown field
    ("Job", lambda o: o["spec"]["template"]["spec"]["containers"][0].pop("name")),  # a required field
    ("Deployment", lambda o: o["spec"].update(replicas="one")),  # a wrong type
    ("NetworkPolicy", lambda o: o["spec"].update(policyTypes="Ingress")),
    # The schemas check fields and types, not ranges: port -1 passes them (the API server refuses it).
    ("Service", lambda o: o["spec"]["ports"][0].update(port="2379/tcp")),
    ("Secret", lambda o: o.update(data=["ca.pem"])),
])
def test_a_broken_object_fails_the_validation(demo, tmp_path, kind, change):
    objects = broken(rendered(demo, tmp_path), kind, change)
    assert validate_all(objects)


# ---- content ---------------------------------------------------------------------------------------


def test_every_site_has_its_job_and_headless_service(three, tmp_path):
    objects = rendered(three, tmp_path)
    for s in three.sites:
        job = one(objects, "Job", site_part(s.name))
        assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 1
        spec = job["spec"]["template"]["spec"]
        assert spec["subdomain"] == site_part(s.name)
        assert one(objects, "Service", site_part(s.name))["spec"]["clusterIP"] == "None"
        argv = container(spec, "site")["command"]
        assert argv[:4] == ["geotrain", "site", s.name, "/topology/topology.yaml"]
        assert flag(argv, "--etcd") == f"etcd:{ETCD_PORT}" and flag(argv, "--run-dir") == "/run"
    assert sorted(o["metadata"]["name"] for o in by(objects, "Job")) == sorted(site_part(s) for s in three.site_names)


@pytest.mark.parametrize("name", ["demo.yaml", "three-continents.yaml"])
def test_a_site_across_a_wan_talks_to_the_coordinator_through_its_own_link_sidecar(repo, tmp_path, name):
    topo = load_topology(repo / "topologies" / name)
    objects = rendered(topo, tmp_path)
    compose_doc = compose.render(topo)
    for s in topo.sites:
        spec = pod_spec(objects, "Job", site_part(s.name))
        site_argv = container(spec, "site")["command"]
        links = [c for c in spec.get("initContainers", []) if c["name"] == "link"]
        if topo.link(s.name, topo.coordinator.at) is None:  # in the coordinator's datacenter: no WAN, no link
            assert links == [] and flag(site_argv, "--coordinator") == f"coordinator:{COORDINATOR_PORT}"
            continue
        (link,) = links
        assert link["restartPolicy"] == "Always"  # a native sidecar: the Job completes when the site does
        argv = link["command"]
        assert argv[:2] == ["geotrain", "link"]
        assert flag(site_argv, "--coordinator") == flag(argv, "--listen") == f"127.0.0.1:{LINK_PORT}"
        assert flag(argv, "--target") == f"coordinator:{COORDINATOR_PORT}"
        # the same emulated link as the Compose rendering of the same topology
        shell = compose_doc["services"][compose.link_service(s.name)]["command"][-1]
        want = shell.split("exec ", 1)[1].split()
        for opt in ("--name", "--bandwidth", "--latency", "--jitter", "--loss", "--seed", "--stats-file"):
            assert flag(argv, opt).strip("'") == flag(want, opt).strip("'"), opt
        # it listens before the site starts: the init containers run in order, a sidecar's startup probe first
        names = [c["name"] for c in spec["initContainers"]]
        assert names.index("wait-for-control-plane") < names.index("link") and "startupProbe" in link


def expected_paths(topo):
    """The paths the topology draws, independently of the renderer: every site's pod reaches the coordinator
    (through its link, inside its pod, or directly in the coordinator's datacenter) and etcd; the
    coordinator reaches etcd; whoever dials a name reaches DNS; the pods of one multi-node site reach each
    other on every TCP port (the store, then gloo/NCCL on ports of their choosing). Nothing between sites."""
    dns = {("kube-dns", 53, "UDP"), ("kube-dns", 53, "TCP")}
    out = {("coordinator", "etcd", ETCD_PORT, "TCP")} | {("coordinator", *d) for d in dns}
    tcp_ports = {OTHER_PORT, COORDINATOR_PORT, ETCD_PORT, 53}  # every TCP port some policy names, and one none does
    for s in topo.sites:
        pods = [site_part(s.name)] if s.nodes == 1 else [f"{site_part(s.name)}-{k}" for k in range(s.nodes)]
        for pod in pods:
            out |= {(pod, "coordinator", COORDINATOR_PORT, "TCP"), (pod, "etcd", ETCD_PORT, "TCP")}
            out |= {(pod, *d) for d in dns}
            out |= {(pod, other, port, "TCP") for other in pods if other != pod for port in tcp_ports}
    return out


@pytest.mark.parametrize("name", ["demo.yaml", "three-continents.yaml"])
def test_the_network_policies_allow_exactly_the_topologys_paths(repo, tmp_path, name):
    topo = load_topology(repo / "topologies" / name)
    assert allowed_paths(rendered(topo, tmp_path)) == expected_paths(topo)


def extra_policy(objects, name, spec):
    ns = objects[0]["metadata"]["name"]
    return objects + [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                       "metadata": {"name": name, "namespace": ns}, "spec": spec}]


def test_the_policy_check_fails_a_rendering_with_an_extra_path(demo, tmp_path):
    objects = rendered(demo, tmp_path)
    a, b = ({"matchLabels": {"geotrain/site": s}} for s in demo.site_names)
    # a path between the two sites, opened at both ends
    worse = extra_policy(objects, "a-to-b", {"podSelector": a, "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": b}]}]})
    worse = extra_policy(worse, "b-from-a", {"podSelector": b, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": a}]}]})
    got = allowed_paths(worse)
    assert got != expected_paths(demo)
    assert ("site-us-east", "site-eu-west", OTHER_PORT, "TCP") in got - expected_paths(demo)
    # one end alone opens nothing: the other end's policy still refuses it
    half = extra_policy(objects, "a-to-b", {"podSelector": a, "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": b}]}]})
    assert allowed_paths(half) == expected_paths(demo)


@pytest.mark.parametrize("what", ["no-default-deny", "etcd-from-anywhere", "ip-block", "coordinator-any-port"])
def test_the_policy_check_fails_other_broken_renderings(demo, tmp_path, what):
    objects = rendered(demo, tmp_path)
    pols = {o["metadata"]["name"]: o for o in objects if o["kind"] == "NetworkPolicy"}
    if what == "no-default-deny":  # etcd's policy still guards etcd, but nothing guards the sites' way out
        objects.remove(pols["default-deny"])
        pols["site-us-east"]["spec"]["policyTypes"] = ["Ingress"]
    elif what == "etcd-from-anywhere":
        pols["etcd"]["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})
    elif what == "ip-block":
        pols["site-eu-west"]["spec"]["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})
    elif what == "coordinator-any-port":  # both ends: the coordinator's ingress and a site's egress
        del pols["coordinator"]["spec"]["ingress"][0]["ports"]
        del pols["site-us-east"]["spec"]["egress"][0]["ports"]
    assert allowed_paths(objects) != expected_paths(demo)


def test_each_part_gets_the_ca_and_its_own_pair_only(demo, tmp_path):
    out = tmp_path / "k8s"
    write_deployment(demo, out)
    assert stat.S_IMODE((out / "02-secrets.yaml").stat().st_mode) == 0o600
    objects = load_rendered(out)
    secrets = {o["metadata"]["name"]: set(o["data"]) for o in by(objects, "Secret")}
    assert secrets == {"certs-etcd": {"ca.pem", "etcd.pem", "etcd-key.pem", "launcher.pem", "launcher-key.pem"},
                       "certs-coordinator": {"ca.pem", "coordinator.pem", "coordinator-key.pem", "launcher.pem",
                                             "launcher-key.pem"},
                       **{f"certs-site-{s}": {"ca.pem", f"site.{s}.pem", f"site.{s}-key.pem"} for s in demo.site_names}}
    for o in by(objects, "Secret"):  # the bytes are the certificate directory's
        for f, data in o["data"].items():
            assert base64.b64decode(data) == (out / "certs" / f).read_bytes()
    for kind, name, secret in [("Deployment", "coordinator", "certs-coordinator"), ("StatefulSet", "etcd", "certs-etcd")] + \
            [("Job", site_part(s), f"certs-site-{s}") for s in demo.site_names]:
        vols = {v["name"]: v for v in pod_spec(objects, kind, name)["volumes"]}
        assert vols["certs"]["secret"]["secretName"] == secret
    link = container(pod_spec(objects, "Job", "site-us-east"), "link")
    assert all(m["name"] != "certs" for m in link["volumeMounts"])  # a TCP proxy: it holds no key


def test_coordinator_probes_use_the_grpc_health_service(demo, tmp_path):
    plain = rendered(demo.model_copy(update={"security": demo.security.model_copy(update={"tls": False})}), tmp_path / "p")
    c = container(pod_spec(plain, "Deployment", "coordinator"), "coordinator")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": COORDINATOR_PORT, "service": "geotrain.v1.Coordinator"}
    # mTLS: the kubelet's grpc probe cannot present a certificate, so the same Check runs in the pod
    tls = container(pod_spec(rendered(demo, tmp_path / "t"), "Deployment", "coordinator"), "coordinator")
    code = tls["livenessProbe"]["exec"]["command"][2]
    assert "HealthStub" in code and "/certs/launcher.pem" in code and "POD_IP" in code
    assert flag(tls["command"], "--bind") == f"$(POD_IP):{COORDINATOR_PORT}"
    assert any(e["name"] == "POD_IP" for e in tls["env"])


def test_etcd_runs_as_launch_runs_it_and_is_ready_only_with_auth_enforced(demo, tmp_path):
    etcd = container(pod_spec(rendered(demo, tmp_path / "t"), "StatefulSet", "etcd"), "etcd")
    assert etcd["command"][:4] == ["python", "-m", "geotrain.control.serve", "serve"]
    assert flag(etcd["command"], "--advertise") == "etcd" and flag(etcd["command"], "--certs") == "/certs"
    assert etcd["readinessProbe"]["exec"]["command"][3] == "check"
    plain = rendered(demo.model_copy(update={"security": demo.security.model_copy(update={"tls": False})}), tmp_path / "p")
    etcd = container(pod_spec(plain, "StatefulSet", "etcd"), "etcd")
    assert "--certs" not in etcd["command"] and etcd["readinessProbe"]["httpGet"]["path"] == "/health"


def test_every_python_command_compiles(three, tmp_path):
    for o in rendered(three, tmp_path):
        if o["kind"] not in ("Job", "Deployment", "StatefulSet"):
            continue
        spec = o["spec"]["template"]["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            cmds = [c["command"]] + [c[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
                                     if "exec" in c.get(p, {})]
            for cmd in cmds:
                if cmd[:2] == ["python", "-c"]:
                    compile(cmd[2], f"{o['metadata']['name']}/{c['name']}", "exec")


def test_wait_for_returns_once_every_address_answers():
    with socket.socket() as a, socket.socket() as b:
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.listen()
        cmd = wait_for(*(f"127.0.0.1:{s.getsockname()[1]}" for s in (a, b)))
        subprocess.run([sys.executable, *cmd[1:]], check=True, timeout=30)


def test_the_topology_configmap_loads_back_to_the_same_topology(demo, tmp_path):
    objects = rendered(demo, tmp_path)
    text = one(objects, "ConfigMap", "topology")["data"]["topology.yaml"]
    assert parse_topology(yaml.safe_load(text)).digest() == demo.digest()
    assert text == topology_yaml(demo, "<topology>")


def test_objects_come_from_the_topology_not_a_template(tmp_path):
    objects = rendered(topo_of(["a", "b", "c"]), tmp_path, namespace="team-x")
    assert {o["metadata"]["namespace"] for o in objects if o["kind"] != "Namespace"} == {"team-x"}
    assert sorted(o["metadata"]["name"] for o in by(objects, "Job")) == ["site-a", "site-b", "site-c"]
    assert allowed_paths(objects) == expected_paths(topo_of(["a", "b", "c"]))


def test_a_cuda_site_asks_for_a_gpu_per_worker(tmp_path):
    topo = parse_topology({"name": "t", "sites": [{"name": "g", "workers": 4, "device": "cuda"}, {"name": "c", "workers": 1}]})
    objects = rendered(topo, tmp_path)
    assert container(pod_spec(objects, "Job", "site-g"), "site")["resources"] == {"limits": {"nvidia.com/gpu": 4}}
    assert "resources" not in container(pod_spec(objects, "Job", "site-c"), "site")


def test_storage_class_and_size_reach_every_claim(demo, tmp_path):
    from geotrain.run.k8s import Storage

    objects = rendered(demo, tmp_path, storage=Storage(size="5Gi", storage_class="fast"))
    claims = by(objects, "PersistentVolumeClaim") + one(objects, "StatefulSet", "etcd")["spec"]["volumeClaimTemplates"]
    assert len(claims) == 1 + len(demo.sites) + 1
    assert all(c["spec"]["storageClassName"] == "fast" and c["spec"]["resources"]["requests"]["storage"] == "5Gi"
               for c in claims)


# ---- sites of several nodes -------------------------------------------------------------------------


def multi_node(repo, nodes=2, tls=True):
    return load_topology(repo / "topologies" / "demo.yaml",
                         [f"sites[0].nodes={nodes}", f"security.tls={str(tls).lower()}"])


@pytest.mark.parametrize("tls", [True, False])
def test_a_multi_node_site_validates_against_the_kubernetes_schemas(repo, tmp_path, tls):
    objects = rendered(multi_node(repo, 3, tls), tmp_path)
    assert validate_all(objects) == []


def test_a_multi_node_site_runs_one_node_per_pod_of_one_indexed_job(repo, tmp_path):
    topo = multi_node(repo, 3)
    objects = rendered(topo, tmp_path)
    part = site_part("us-east")
    job = one(objects, "Job", part)["spec"]
    assert (job["completionMode"], job["completions"], job["parallelism"]) == ("Indexed", 3, 3)
    spec = job["template"]["spec"]
    assert spec["subdomain"] == part and spec["restartPolicy"] == "OnFailure"
    site = container(spec, "site")
    argv = site["command"]
    # the pod's completion index is its node rank; node 0's pod, by its DNS name, hosts the rendezvous
    assert flag(argv, "--node-rank") == "$(NODE_RANK)"
    assert flag(argv, "--master-addr") == master_addr("us-east") == f"{part}-0.{part}"
    assert flag(argv, "--master-port") == str(RENDEZVOUS_PORT)
    (rank,) = [e for e in site["env"] if e["name"] == "NODE_RANK"]  # defined, so Kubernetes expands $(NODE_RANK)
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"} in site["ports"]
    # each node its own directory of the site's claim, which pods on several machines mount at once
    (run,) = [m for m in site["volumeMounts"] if m["name"] == "run"]
    assert run["subPathExpr"] == "node-$(NODE_RANK)" and run["mountPath"] == "/run"
    assert one(objects, "PersistentVolumeClaim", f"{part}-run")["spec"]["accessModes"] == ["ReadWriteMany"]
    svc = one(objects, "Service", part)["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
    assert svc["ports"] == [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": "rendezvous", "protocol": "TCP"}]
    # the one-node site is as before
    other = site_part("eu-west")
    assert one(objects, "Job", other)["spec"]["completions"] == 1
    single = container(pod_spec(objects, "Job", other), "site")
    assert "--node-rank" not in single["command"] and "subPathExpr" not in str(single["volumeMounts"])
    assert one(objects, "PersistentVolumeClaim", f"{other}-run")["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("rank", [0, 2])
def test_each_pods_command_is_one_geotrain_site_accepts(repo, tmp_path, monkeypatch, rank):
    """The site command with $(NODE_RANK) expanded as the kubelet does, through geotrain site's own parser
    and node check (run_site is replaced: nothing starts)."""
    from geotrain.run import site as site_mod

    topo = multi_node(repo, 3)
    argv = container(pod_spec(rendered(topo, tmp_path), "Job", site_part("us-east")), "site")["command"]
    argv = [a.replace("$(NODE_RANK)", str(rank)) for a in argv]
    seen = {}

    def fake_run_site(t, name, run_dir, etcd, coordinator, script, *, certs, node, exec_argv, print_env):
        seen.update(node=node, problem=site_mod.node_problem(t.site(name), node), etcd=etcd, coordinator=coordinator)
        return 0

    (tmp_path / "topology.yaml").write_text(topology_yaml(topo, "test"))
    argv[argv.index("/topology/topology.yaml")] = str(tmp_path / "topology.yaml")
    monkeypatch.setattr(site_mod, "run_site", fake_run_site)
    assert argv[:2] == ["geotrain", "site"] and site_mod.main(argv[2:]) == 0
    assert seen["problem"] is None
    assert (seen["node"].rank, seen["node"].master_addr, seen["node"].master_port) == (rank, master_addr("us-east"), RENDEZVOUS_PORT)


def test_the_pods_of_a_multi_node_site_reach_each_other_and_nothing_more(repo, tmp_path):
    topo = multi_node(repo, 3)
    objects = rendered(topo, tmp_path)
    got = allowed_paths(objects)
    assert got == expected_paths(topo)
    assert ("site-us-east-0", "site-us-east-2", OTHER_PORT, "TCP") in got  # gloo's ports, whatever they are
    assert not any(src.startswith("site-us-east") and dst == "site-eu-west" for src, dst, _, _ in got)


def test_the_policy_check_fails_a_multi_node_site_cut_off_from_itself(repo, tmp_path):
    topo = multi_node(repo, 2)
    objects = rendered(topo, tmp_path)
    (pol,) = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "site-us-east"]
    del pol["spec"]["ingress"]  # egress towards the other node is still allowed; its ingress is not
    assert allowed_paths(objects) != expected_paths(topo)
    assert ("site-us-east-0", "site-us-east-1", OTHER_PORT, "TCP") not in allowed_paths(objects)


def test_a_ring_topology_is_refused_with_the_reason(tmp_path):
    with pytest.raises(RenderError, match="training.merge"):
        write_deployment(topo_of(["a", "b"], training={"merge": "ring"}), tmp_path / "k8s")
    assert not (tmp_path / "k8s").exists()


def test_tls_without_certificates_is_refused(demo):
    with pytest.raises(RenderError, match="certificates"):
        render(demo, topology_text="")


# ---- the command ----------------------------------------------------------------------------------


def test_cli_renders_with_overrides(repo, tmp_path, capsys):
    out = tmp_path / "k8s"
    assert main(["render", str(repo / "topologies" / "demo.yaml"), "-o", str(out), "--set", "training.rounds=3",
                 "--image", "reg.example/geotrain:1"]) == 0
    printed = capsys.readouterr().out.split()
    assert str(out / "40-network-policies.yaml") in printed
    objects = load_rendered(out)
    text = one(objects, "ConfigMap", "topology")["data"]["topology.yaml"]
    assert yaml.safe_load(text)["training"]["rounds"] == 3
    assert {c["image"] for o in by(objects, "Job") for c in o["spec"]["template"]["spec"]["containers"]} == {"reg.example/geotrain:1"}
    # rendering again keeps the certificates (the CA of a deployment that may be running)
    ca = (out / "certs" / "ca.pem").read_bytes()
    assert main(["render", str(repo / "topologies" / "demo.yaml"), "-o", str(out)]) == 0
    assert (out / "certs" / "ca.pem").read_bytes() == ca


def test_cli_bad_input_is_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsites: []\n")
    assert main(["render", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "geotrain k8s" in capsys.readouterr().err
    assert main(["nothing"]) == 2


def test_runs_as_a_module(repo, tmp_path):
    out = tmp_path / "k8s"
    subprocess.run([sys.executable, "-m", "geotrain.run.k8s", "render", str(repo / "topologies" / "demo.yaml"),
                    "-o", str(out)], check=True, capture_output=True, timeout=120, cwd=repo)
    assert (out / "30-site-us-east.yaml").is_file()
