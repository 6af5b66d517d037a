"""``geotrain k8s render``: a topology as Kubernetes objects, one part per pod.

    geotrain k8s render TOPOLOGY -o DIR [--set path=value ...] [--image NAME] [--namespace NS]
                        [--storage-class NAME] [--storage SIZE]

writes one YAML file per part into ``DIR`` (``kubectl apply -f DIR`` applies them in name order,
the namespace first) and the run's certificates into ``DIR/certs`` (not applied: ``-f`` does not
recurse). Nothing is started, and no cluster is needed to render.

=======================  ===============================================================================
``00-namespace.yaml``    the Namespace (default: the topology's name)
``01-topology.yaml``     ConfigMap ``topology``: the validated topology (overrides applied), mounted at
                         ``/topology/topology.yaml`` in every pod
``02-secrets.yaml``      with ``security.tls`` (the default): a Secret per part, holding the CA
                         certificate and that part's own pair only, never the CA's key (mode 0600);
                         etcd's and the coordinator's also the launcher's pair (etcd's bootstraps its
                         auth with it, the coordinator's probe asks Health/Check with it)
``10-etcd.yaml``         etcd: a headless Service ``etcd`` (2379) and a StatefulSet of one, its data on a
                         volume claim, run by ``geotrain.control.serve`` as ``geotrain launch`` runs it
                         (with TLS: https and auth, its probes ``serve check``: healthy *and* auth
                         enforced; plaintext: etcd's ``/health``)
``20-coordinator.yaml``  ``geotrain coordinator``: a Deployment of one (``Recreate``: never two at once),
                         a Service ``coordinator`` (7000), a claim for its run directory (it resumes from
                         ``/run/coordinator`` when its pod restarts); probes on the gRPC health service
``30-site-<name>.yaml``  per site: an Indexed Job of one pod per node (``completions`` = ``sites[].nodes``),
                         a headless Service ``site-<name>`` (the pods' DNS names), a claim for the site's
                         run directory. Each pod runs ``geotrain site NAME`` (with several nodes: one node
                         each, below); a site whose place differs from ``coordinator.at`` has its link
                         emulator beside it, a native sidecar running ``geotrain link`` on
                         127.0.0.1:7100 towards ``coordinator:7000``, and the site dials that
``40-network-policies``  deny everything to and from the run's pods, then allow only what the topology
                         draws: each site to the coordinator (7000) and to etcd (2379), the coordinator to
                         etcd, DNS to kube-dns, the pods of one multi-node site to each other (TCP, any
                         port: its process group); nothing between sites, nothing from outside
=======================  ===============================================================================

Sites of several nodes (``sites[].nodes`` > 1): the Job runs ``nodes`` pods at once (``parallelism``
= ``completions``); the pod of completion index K runs ``geotrain site NAME --node-rank K --master-addr
site-NAME-0.site-NAME --master-port 29500`` (K from the pod's ``batch.kubernetes.io/job-completion-index``
annotation), so node 0's pod hosts the site's rendezvous store and rank 0 of the site, its leader, the one
that talks to the coordinator (geotrain.run.nodes). The headless Service publishes the pods before they are
ready (the nodes meet before any is). The site's claim is then ``ReadWriteMany`` (pods of one site run on
different machines: ``--storage-class`` must name a class that offers it, NFS, CephFS, EFS, Filestore...)
and each pod mounts its own sub-directory ``node-K`` of it, where its workers keep their checkpoint parts.
Every pod has the link sidecar (one template); only the leader's carries traffic.

Probes: the kubelet's own ``grpc`` probe cannot present a client certificate ("built-in probes do
not support any authentication parameters", Kubernetes' probe docs), and with mTLS the coordinator
demands one on every call, the health service included. So the coordinator's probes are of type
``grpc`` when ``security.tls`` is false and otherwise an ``exec`` of the same Health/Check asked with
the launcher's certificate (as the Compose healthcheck does).

Not yet rendered: ring and hierarchical merges (``geotrain site`` starts no ring
peers; refused), Prometheus scraping (no policy lets a scraper in). :func:`render` is pure:
(topology, certificate bytes) in, a list of objects out; :func:`write_deployment` writes them.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import yaml

from geotrain.config.derive import derive
from geotrain.config.topology import Topology
from geotrain.errors import GeotrainError
from geotrain.run.compose import DEFAULT_IMAGE, link_files, remote_sites

# The oldest Kubernetes whose API the objects are written for: native sidecars (an init container
# with restartPolicy: Always) are on by default from 1.29. tests/deploy validate against it and the newest.
MIN_KUBERNETES = "1.29"

ETCD_PORT = 2379
ETCD_PEER_PORT = 2380
COORDINATOR_PORT = 7000
LINK_PORT = 7100
RENDEZVOUS_PORT = 29500
"""Where the nodes of a multi-node site meet (node 0's pod: ``--master-port``)."""
DNS_PORT = 53
RUN_MOUNT = "/run"
TOPOLOGY_DIR = "/topology"
TOPOLOGY_PATH = f"{TOPOLOGY_DIR}/topology.yaml"
CERTS_MOUNT = "/certs"
ETCD_DATA = "/var/lib/etcd"
HEALTH_SERVICE = "geotrain.v1.Coordinator"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_SITE = "geotrain/site"

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


class RenderError(GeotrainError):
    """The topology cannot be rendered for Kubernetes (yet): the message says which field and why."""

    exit_code = 2


@dataclass(frozen=True)
class Storage:
    """Volume claims of the rendering: their size and storage class (None: the cluster's default)."""

    size: str = "1Gi"
    storage_class: str | None = None


# ---- names and labels ---------------------------------------------------------------------------


def site_part(site: str) -> str:
    """The name of a site's Job, Service, claim and NetworkPolicy."""
    return f"site-{site}"


def master_addr(site: str) -> str:
    """Node 0's pod of a multi-node site, by the name the Job's index and the headless Service give it."""
    return f"{site_part(site)}-0.{site_part(site)}"


def secret_name(part: str) -> str:
    return f"certs-{part}"


def labels(topo: Topology, component: str, site: str | None = None) -> dict[str, str]:
    """The labels of a part's pods (and of its other objects): what the NetworkPolicies select on."""
    out = {LABEL_NAME: "geotrain", LABEL_INSTANCE: topo.name, LABEL_COMPONENT: component}
    if site is not None:
        out[LABEL_SITE] = site
    return out


def instance_selector(topo: Topology) -> dict[str, str]:
    """Every pod of this run, and no other."""
    return {LABEL_NAME: "geotrain", LABEL_INSTANCE: topo.name}


def renderable_problem(topo: Topology, namespace: str) -> str | None:
    """Why ``topo`` cannot be rendered (None: it can): names Kubernetes would refuse, features not there yet."""
    if not _DNS_LABEL.match(namespace):
        return f"namespace {namespace!r}: not a DNS label (lower-case letters, digits, '-', at most 63)"
    for s in topo.sites:
        if not _DNS_LABEL.match(site_part(s.name)):
            return f"sites: {s.name!r} gives the object name {site_part(s.name)!r}, not a DNS label (it ends with '-'?)"
        if s.nodes > 1 and not _DNS_LABEL.match(f"{site_part(s.name)}-{s.nodes - 1}"):
            return (f"sites: {s.name!r} with {s.nodes} nodes names its pods {site_part(s.name)}-0.., "
                    "longer than a DNS label (63 characters)")
    if topo.training.merge != "star" and len(topo.sites) > 1:
        return (f"training.merge: {topo.training.merge!r}: sites on separate hosts (geotrain site) start no ring peers "
                "yet; render a star topology")
    return None


# ---- the pure part --------------------------------------------------------------------------------


def _meta(name: str, namespace: str, lab: Mapping[str, str]) -> dict:
    return {"name": name, "namespace": namespace, "labels": dict(lab)}


def _env(**values: str) -> list[dict]:
    return [{"name": k, "value": v} for k, v in values.items()]


BASE_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}


def _container(name: str, image: str, command: list[str], *, mounts: list[dict], **extra) -> dict:
    c = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": _env(**BASE_ENV),
        **({"volumeMounts": mounts} if mounts else {}),
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    c.update(extra)
    return c


def _pod_spec(containers: list[dict], volumes: list[dict], *, init: list[dict] = (), **extra) -> dict:
    spec = {
        "automountServiceAccountToken": False,  # no part talks to the Kubernetes API
        "enableServiceLinks": False,  # no *_PORT variables of other Services in the parts' environment
        "terminationGracePeriodSeconds": 10,
        "containers": containers,
        "volumes": volumes,
    }
    if init:
        spec["initContainers"] = list(init)
    spec.update(extra)
    return spec


def _claim(name: str, namespace: str, lab: Mapping[str, str], storage: Storage, shared: bool = False) -> dict:
    """``shared``: mounted by pods on several machines at once (ReadWriteMany), else by one (ReadWriteOnce)."""
    spec = {"accessModes": ["ReadWriteMany" if shared else "ReadWriteOnce"], "resources": {"requests": {"storage": storage.size}}}
    if storage.storage_class is not None:
        spec["storageClassName"] = storage.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(name, namespace, lab), "spec": spec}


def _py(code: str) -> list[str]:
    return ["python", "-c", code]


def wait_for(*addresses: str) -> list[str]:
    """A command that returns once a TCP connection to every HOST:PORT succeeds (a part waits for what it needs)."""
    targets = [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in addresses]
    return _py("import socket, sys, time\n"
               f"for host, port in {targets!r}:\n"
               "    while True:\n"
               "        try:\n"
               "            socket.create_connection((host, port), 2).close(); break\n"
               "        except OSError as exc:\n"
               "            print(f'waiting for {host}:{port}: {exc}', file=sys.stderr, flush=True); time.sleep(1)\n")


def health_check_command(tls: bool) -> list[str]:
    """Health/Check of the coordinator at its pod address, SERVING or a non-zero exit; with ``tls`` asked
    with the launcher's certificate (the server demands one of the run's on every call)."""
    if tls:
        d = CERTS_MOUNT
        channel = ("r = lambda n: open(n, 'rb').read(); "
                   f"cr = grpc.ssl_channel_credentials(r('{d}/ca.pem'), r('{d}/launcher-key.pem'), r('{d}/launcher.pem')); "
                   "c = grpc.secure_channel(addr, cr, options=[('grpc.ssl_target_name_override', 'coordinator')]); ")
    else:
        channel = "c = grpc.insecure_channel(addr); "
    return _py("import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; "
               f"addr = os.environ['POD_IP'] + ':{COORDINATOR_PORT}'; " + channel +
               f"r = g.HealthStub(c).Check(h.HealthCheckRequest(service='{HEALTH_SERVICE}'), timeout=3); "
               "sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)")


def coordinator_probe(tls: bool) -> dict:
    """The coordinator's probe action: the kubelet's grpc probe in plaintext, an exec of Health/Check with mTLS."""
    if tls:
        return {"exec": {"command": health_check_command(True)}}
    return {"grpc": {"port": COORDINATOR_PORT, "service": HEALTH_SERVICE}}


def _cert_files(part_names: tuple[str, ...]) -> list[str]:
    return ["ca.pem"] + [f for n in part_names for f in (f"{n}.pem", f"{n}-key.pem")]


def cert_secret(topo: Topology, namespace: str, part: str, names: tuple[str, ...], certs: Mapping[str, bytes],
                lab: Mapping[str, str]) -> dict:
    """The Secret of one part: the CA certificate and the pairs ``names`` (its own), nothing else."""
    missing = [f for f in _cert_files(names) if f not in certs]
    if missing:
        raise RenderError(f"certificates: no {', '.join(missing)} for {part}")
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(secret_name(part), namespace, lab),
            "data": {f: base64.b64encode(certs[f]).decode() for f in _cert_files(names)}}


def _dns_peer() -> dict:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}


def _dns_rule() -> dict:
    return {"to": [_dns_peer()], "ports": [{"protocol": "UDP", "port": DNS_PORT}, {"protocol": "TCP", "port": DNS_PORT}]}


def _policy(topo: Topology, namespace: str, name: str, selector: Mapping[str, str], *,
            ingress: list[dict] | None = None, egress: list[dict] | None = None) -> dict:
    spec: dict = {"podSelector": {"matchLabels": dict(selector)}, "policyTypes": ["Ingress", "Egress"]}
    if ingress:
        spec["ingress"] = ingress
    if egress:
        spec["egress"] = egress
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(name, namespace, instance_selector(topo)), "spec": spec}


def network_policies(topo: Topology, namespace: str) -> list[dict]:
    """Deny all to and from the run's pods, then one policy per part allowing only the topology's paths."""
    def peer(lab):
        return {"podSelector": {"matchLabels": lab}}

    def tcp(port):
        return [{"protocol": "TCP", "port": port}]

    coordinator, etcd = labels(topo, "coordinator"), labels(topo, "etcd")
    sites = [labels(topo, "site", s.name) for s in topo.sites]
    out = [_policy(topo, namespace, "default-deny", instance_selector(topo)),
           _policy(topo, namespace, "etcd", etcd,
                   ingress=[{"from": [peer(coordinator)] + [peer(s) for s in sites], "ports": tcp(ETCD_PORT)}]),
           _policy(topo, namespace, "coordinator", coordinator,
                   ingress=[{"from": [peer(s) for s in sites], "ports": tcp(COORDINATOR_PORT)}],
                   egress=[{"to": [peer(etcd)], "ports": tcp(ETCD_PORT)}, _dns_rule()])]
    for s, lab in zip(topo.sites, sites):
        egress = [{"to": [peer(coordinator)], "ports": tcp(COORDINATOR_PORT)},
                  {"to": [peer(etcd)], "ports": tcp(ETCD_PORT)}, _dns_rule()]
        ingress = None
        if s.nodes > 1:  # the site's process group: its store, then gloo/NCCL on ports of their choosing
            own = [{"from": [peer(lab)], "ports": [{"protocol": "TCP"}]}]
            ingress, egress = own, egress + [{"to": [peer(lab)], "ports": [{"protocol": "TCP"}]}]
        out.append(_policy(topo, namespace, site_part(s.name), lab, ingress=ingress, egress=egress))
    return out


def render(topo: Topology, *, topology_text: str, certs: Mapping[str, bytes] | None = None,
           image: str = DEFAULT_IMAGE, namespace: str | None = None, storage: Storage = Storage()) -> dict[str, list[dict]]:
    """The objects deploying ``topo``, by file name (``00-namespace.yaml`` ...), in the order to apply them.

    ``topology_text``: the topology file every pod reads (the ConfigMap's content). ``certs``: file name ->
    PEM bytes of a certificate directory (geotrain certs init) when security.tls is on; each part's Secret
    holds the CA and its own pair. ``namespace``: default the topology's name."""
    ns = namespace or topo.name
    problem = renderable_problem(topo, ns)
    if problem is not None:
        raise RenderError(problem)
    tls = topo.security.tls
    if tls and certs is None:
        raise RenderError("security.tls is on: give the run's certificates (geotrain certs init)")
    files: dict[str, list[dict]] = {}
    inst = instance_selector(topo)
    files["00-namespace.yaml"] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": inst}}]
    files["01-topology.yaml"] = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("topology", ns, inst),
                                  "data": {"topology.yaml": topology_text}}]
    if tls:
        files["02-secrets.yaml"] = (
            [cert_secret(topo, ns, "etcd", ("etcd", "launcher"), certs, labels(topo, "etcd")),
             cert_secret(topo, ns, "coordinator", ("coordinator", "launcher"), certs, labels(topo, "coordinator"))]
            + [cert_secret(topo, ns, site_part(s.name), (f"site.{s.name}",), certs, labels(topo, "site", s.name))
               for s in topo.sites])

    topo_volume = {"name": "topology", "configMap": {"name": "topology"}}
    topo_mount = {"name": "topology", "mountPath": TOPOLOGY_DIR, "readOnly": True}
    run_mount = {"name": "run", "mountPath": RUN_MOUNT}
    cert_mount = {"name": "certs", "mountPath": CERTS_MOUNT, "readOnly": True}
    certs_flag = ["--certs", CERTS_MOUNT] if tls else []

    def cert_volume(part):
        return [{"name": "certs", "secret": {"secretName": secret_name(part), "defaultMode": 0o400}}] if tls else []

    # etcd: one member run as `geotrain launch` runs it (geotrain.control.serve): with TLS, https client and
    # peer URLs demanding a certificate of the run's CA and auth on (each part's certificate name is its etcd
    # user); ready only once auth is enforced, and the headless Service gives its name only to a ready pod.
    el = labels(topo, "etcd")
    if tls:
        etcd_probe = {"exec": {"command": ["python", "-m", "geotrain.control.serve", "check", TOPOLOGY_PATH,
                                           "--endpoint", f"127.0.0.1:{ETCD_PORT}", *certs_flag]}, "timeoutSeconds": 10}
    else:
        etcd_probe = {"httpGet": {"path": "/health", "port": "client"}}
    etcd = _container("etcd", image, [
        "python", "-m", "geotrain.control.serve", "serve", TOPOLOGY_PATH, "--data-dir", f"{ETCD_DATA}/etcd",
        "--listen", "0.0.0.0", "--advertise", "etcd", "--port", str(ETCD_PORT), "--peer-port", str(ETCD_PEER_PORT),
        *certs_flag],
        mounts=[topo_mount, {"name": "data", "mountPath": ETCD_DATA}] + ([cert_mount] if tls else []),
        ports=[{"name": "client", "containerPort": ETCD_PORT, "protocol": "TCP"}],
        readinessProbe={**etcd_probe, "periodSeconds": 2, "failureThreshold": 3},
        livenessProbe={**etcd_probe, "initialDelaySeconds": 10, "periodSeconds": 10, "failureThreshold": 6})
    claim = _claim("data", ns, el, storage)
    del claim["apiVersion"], claim["kind"]
    claim["metadata"] = {"name": "data", "labels": dict(el)}
    files["10-etcd.yaml"] = [
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta("etcd", ns, el),
         "spec": {"clusterIP": "None", "selector": dict(el),
                  "ports": [{"name": "client", "port": ETCD_PORT, "targetPort": "client", "protocol": "TCP"}]}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta("etcd", ns, el),
         "spec": {"serviceName": "etcd", "replicas": 1, "selector": {"matchLabels": dict(el)},
                  "template": {"metadata": {"labels": dict(el)},
                               "spec": _pod_spec([etcd], [topo_volume, *cert_volume("etcd")])},
                  "volumeClaimTemplates": [claim]}},
    ]

    # The coordinator: it binds its pod's address (advertised in etcd), serves until deleted (--stay).
    cl = labels(topo, "coordinator")
    probe = coordinator_probe(tls)
    coordinator = _container("coordinator", image, [
        "geotrain", "coordinator", TOPOLOGY_PATH, "--run-dir", RUN_MOUNT, "--etcd", f"etcd:{ETCD_PORT}",
        "--bind", f"$(POD_IP):{COORDINATOR_PORT}", "--stay", *certs_flag],
        mounts=[topo_mount, run_mount] + ([cert_mount] if tls else []),
        ports=[{"name": "grpc", "containerPort": COORDINATOR_PORT, "protocol": "TCP"}],
        startupProbe={**probe, "periodSeconds": 2, "failureThreshold": 90, "timeoutSeconds": 5},
        readinessProbe={**probe, "periodSeconds": 5, "failureThreshold": 3, "timeoutSeconds": 5},
        livenessProbe={**probe, "periodSeconds": 10, "failureThreshold": 6, "timeoutSeconds": 5})
    coordinator["env"].append({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    wait_etcd = _container("wait-for-etcd", image, wait_for(f"etcd:{ETCD_PORT}"), mounts=[])
    files["20-coordinator.yaml"] = [
        _claim("coordinator-run", ns, cl, storage),
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta("coordinator", ns, cl),
         "spec": {"selector": dict(cl),
                  "ports": [{"name": "grpc", "port": COORDINATOR_PORT, "targetPort": "grpc", "protocol": "TCP"}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta("coordinator", ns, cl),
         "spec": {"replicas": 1, "strategy": {"type": "Recreate"},  # two coordinators of a run never at once
                  "selector": {"matchLabels": dict(cl)},
                  "template": {"metadata": {"labels": dict(cl)}, "spec": _pod_spec(
                      [coordinator],
                      [topo_volume, {"name": "run", "persistentVolumeClaim": {"claimName": "coordinator-run"}},
                       *cert_volume("coordinator")],
                      init=[wait_etcd])}}},
    ]

    # The sites: an Indexed Job each, its link emulator a native sidecar when it crosses a WAN.
    links = derive(topo, Path(RUN_MOUNT)).site_links
    remote = set(remote_sites(topo))
    for s in topo.sites:
        part = site_part(s.name)
        sl = labels(topo, "site", s.name)
        init = [_container("wait-for-control-plane", image, wait_for(f"etcd:{ETCD_PORT}", f"coordinator:{COORDINATOR_PORT}"),
                           mounts=[])]
        if s.name in remote:
            stats, control = link_files(topo, s.name, RUN_MOUNT)
            argv = ["geotrain", "link", *links[s.name].args(listen=f"127.0.0.1:{LINK_PORT}",
                                                            target=f"coordinator:{COORDINATOR_PORT}",
                                                            stats_file=stats, control_file=control)]
            listening = {"exec": {"command": _py(
                f"import socket; socket.create_connection(('127.0.0.1', {LINK_PORT}), 2).close()")}}
            init.append(_container("link", image, argv, mounts=[run_mount], restartPolicy="Always",
                                   startupProbe={**listening, "periodSeconds": 1, "failureThreshold": 60},
                                   livenessProbe={**listening, "periodSeconds": 10, "failureThreshold": 6}))
            via = f"127.0.0.1:{LINK_PORT}"
        else:
            via = f"coordinator:{COORDINATOR_PORT}"
        extra = {}
        if s.device == "cuda":
            extra["resources"] = {"limits": {"nvidia.com/gpu": s.workers}}
        multi = s.nodes > 1
        node_flags, site_mount, service_extra = [], run_mount, {}
        if multi:  # one node per pod: the completion index is the node's rank, node 0's pod hosts the store
            node_flags = ["--node-rank", "$(NODE_RANK)", "--master-addr", master_addr(s.name),
                          "--master-port", str(RENDEZVOUS_PORT)]
            site_mount = {**run_mount, "subPathExpr": "node-$(NODE_RANK)"}
            extra["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
            service_extra = {"publishNotReadyAddresses": True,  # the nodes meet before any is ready
                             "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": "rendezvous",
                                        "protocol": "TCP"}]}
        site = _container("site", image, [
            "geotrain", "site", s.name, TOPOLOGY_PATH, "--etcd", f"etcd:{ETCD_PORT}", "--coordinator", via,
            "--run-dir", RUN_MOUNT, *node_flags, *certs_flag],
            mounts=[topo_mount, site_mount] + ([cert_mount] if tls else []), **extra)
        if multi:
            site["env"].append({"name": "NODE_RANK", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
        claim_name = f"{part}-run"
        files[f"30-{part}.yaml"] = [
            _claim(claim_name, ns, sl, storage, shared=multi),
            # Headless: the pods' DNS names (site-x-0.site-x ...), where a multi-node site's nodes meet.
            {"apiVersion": "v1", "kind": "Service", "metadata": _meta(part, ns, sl),
             "spec": {"clusterIP": "None", "selector": dict(sl), **service_extra}},
            {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(part, ns, sl),
             "spec": {"completionMode": "Indexed", "completions": s.nodes, "parallelism": s.nodes,
                      # the site restarts its own workers (recovery.max_restarts); this is for its pod
                      "backoffLimit": topo.recovery.max_restarts,
                      "template": {"metadata": {"labels": dict(sl)}, "spec": _pod_spec(
                          [site],
                          [topo_volume, {"name": "run", "persistentVolumeClaim": {"claimName": claim_name}},
                           *cert_volume(part)],
                          init=init, restartPolicy="OnFailure", subdomain=part)}}},
        ]
    files["40-network-policies.yaml"] = network_policies(topo, ns)
    return files


# ---- writing ---------------------------------------------------------------------------------------


def topology_yaml(topo: Topology, source: str, by: str = "geotrain k8s render") -> str:
    """The validated topology as YAML, fields at their defaults left out (an image of another version reads it)."""
    header = (f"# Rendered by `{by}` from {source} (overrides applied, validated).\n"
              f"# sha256 of the topology: {topo.digest()}\n")
    return header + yaml.safe_dump(topo.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


def read_certs(topo: Topology, where: Path) -> dict[str, bytes]:
    """The run's certificate files in ``where`` (made there first if absent: a fresh CA per deployment)."""
    from geotrain.security.pki import CA_KEY, ensure_run_certs

    ensure_run_certs(where, topo.site_names, topo.name, hosts=("coordinator",))
    return {p.name: p.read_bytes() for p in sorted(where.glob("*.pem")) if p.name != CA_KEY}


class _NoAliases(yaml.SafeDumper):
    """Plain YAML: a dict used twice (a mount, a probe) is written twice, not as an anchor and alias."""

    def ignore_aliases(self, data) -> bool:
        return True


def write_deployment(topo: Topology, out_dir: Path, *, source: str = "<topology>", image: str | None = None,
                     namespace: str | None = None, storage: Storage = Storage()) -> list[Path]:
    """Write the rendered objects into ``out_dir``, one file per part; return the files written."""
    problem = renderable_problem(topo, namespace or topo.name)
    if problem is not None:
        raise RenderError(problem)
    out_dir.mkdir(parents=True, exist_ok=True)
    certs = read_certs(topo, out_dir / "certs") if topo.security.tls else None
    files = render(topo, topology_text=topology_yaml(topo, source), certs=certs, image=image or DEFAULT_IMAGE,
                   namespace=namespace, storage=storage)
    written = []
    for name, objects in files.items():
        path = out_dir / name
        text = (f"# Rendered by `geotrain k8s render` from {source}: do not edit, render again.\n"
                f"# Apply: kubectl apply -f {out_dir}\n")
        text += yaml.dump_all(objects, Dumper=_NoAliases, sort_keys=False, width=1000)
        if name == "02-secrets.yaml":  # private keys: readable by their owner only
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(path, 0o600)
        else:
            path.write_text(text)
        written.append(path)
    return written


def load_rendered(out_dir: Path) -> list[dict]:
    """Every object of a rendered directory, in apply order (for checks and tests)."""
    return [o for p in sorted(out_dir.glob("*.yaml")) for o in yaml.safe_load_all(p.read_text()) if o]


def main(argv: list[str] | None = None) -> int:
    """``geotrain k8s render``: 0 when written, 2 on a bad topology or flag."""
    from geotrain.config.topology import load_topology

    p = argparse.ArgumentParser(prog="geotrain k8s", description="Kubernetes objects of a topology (one part per pod).")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = sub.add_parser("render", help="write the objects into a directory (kubectl apply -f DIR)")
    r.add_argument("topology", type=Path, help="the topology file (YAML)")
    r.add_argument("-o", "--out", type=Path, required=True, help="directory to write the YAML files (and certs/) into")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a field, e.g. --set training.rounds=5")
    r.add_argument("--image", default=None, help=f"image of every container (default {DEFAULT_IMAGE}, deploy/Dockerfile)")
    r.add_argument("--namespace", default=None, help="namespace of every object (default: the topology's name)")
    r.add_argument("--storage", default=Storage.size, help="size of each volume claim (default %(default)s)")
    r.add_argument("--storage-class", default=None, help="storage class of the claims (default: the cluster's)")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        topo = load_topology(args.topology, args.overrides)
        written = write_deployment(topo, args.out, source=str(args.topology), image=args.image, namespace=args.namespace,
                                   storage=Storage(size=args.storage, storage_class=args.storage_class))
    except GeotrainError as exc:
        print(f"geotrain k8s: {exc}", file=sys.stderr)
        return exc.exit_code
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
