"""What a set of NetworkPolicies lets through, evaluated offline (the semantics of networking.k8s.io/v1).

A connection from pod A to pod B on (port, protocol) is allowed when both ends allow it:

- A's egress: no policy of A's namespace selects A with policyType Egress (then anything goes out), or
  some egress rule of such a policy has a peer matching B (no ``to``: every peer) and a port matching
  (no ``ports``: every port);
- B's ingress, the same with the policies selecting B, their ``from`` peers matched against A.

A peer is a podSelector (pods of the policy's namespace), a namespaceSelector (any pod of the matching
namespaces), both (pods matching in the matching namespaces) or an ipBlock, which is taken to match
every pod (conservative: a rendering with an ipBlock shows more paths than it may open, and fails an
exact comparison). ``policyTypes`` absent means Ingress, plus Egress when the policy has egress rules.

:func:`allowed_paths` gives every (source, destination, port, protocol) allowed between the workloads'
pods and a few bystanders (kube-dns, a pod of another namespace, an unlabelled pod of the same
namespace), for the ports any policy names plus one no policy names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WORKLOADS = ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet")
OTHER_PORT = 1  # a port no policy names: stands for "any other port"


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict = field(hash=False)
    namespace_labels: dict = field(hash=False)
    ports: dict = field(default_factory=dict, hash=False)  # port name -> number


def selector_matches(selector: dict | None, lab: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions); an empty one matches everything."""
    selector = selector or {}
    if any(lab.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and lab.get(key) not in values:
            return False
        if op == "NotIn" and key in lab and lab[key] in values:
            return False
        if op == "Exists" and key not in lab:
            return False
        if op == "DoesNotExist" and key in lab:
            return False
    return True


def peer_matches(peer: dict, policy_ns: str, pod: Pod) -> bool:
    if "ipBlock" in peer:
        return True
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], pod.namespace_labels):
            return False
    elif pod.namespace != policy_ns:
        return False
    return "podSelector" not in peer or selector_matches(peer["podSelector"], pod.labels)


def port_matches(rule_ports: list | None, port: int, protocol: str, dst: Pod) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        want = p["port"]
        if isinstance(want, str):
            want = dst.ports.get(want)
            if want is None:
                continue
        if want == port or (p.get("endPort") is not None and want <= port <= p["endPort"]):
            return True
    return False


def _types(policy: dict) -> list[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return spec["policyTypes"]
    return ["Ingress"] + (["Egress"] if spec.get("egress") else [])


def _side_allows(policies: list[dict], kind: str, selected: Pod, other: Pod, port: int, protocol: str, dst: Pod) -> bool:
    key, peers_key = ("egress", "to") if kind == "Egress" else ("ingress", "from")
    applying = [p for p in policies if p["metadata"].get("namespace") == selected.namespace and kind in _types(p)
                and selector_matches(p["spec"].get("podSelector"), selected.labels)]
    if not applying:
        return True
    for p in applying:
        for rule in p["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(peer_matches(q, p["metadata"]["namespace"], other) for q in peers)) \
                    and port_matches(rule.get("ports"), port, protocol, dst):
                return True
    return False


def allowed(policies: list[dict], src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
    return (_side_allows(policies, "Egress", src, dst, port, protocol, dst)
            and _side_allows(policies, "Ingress", dst, src, port, protocol, dst))


def workload_pods(objects: list[dict]) -> list[Pod]:
    """One pod per workload (its template's labels), in its namespace; an Indexed Job of several
    completions one per index, named as Kubernetes names them (``<job>-<index>``)."""
    namespaces = {o["metadata"]["name"]: o["metadata"].get("labels", {}) for o in objects if o["kind"] == "Namespace"}
    pods = []
    for o in objects:
        if o["kind"] not in WORKLOADS:
            continue
        ns = o["metadata"]["namespace"]
        tmpl = o["spec"]["template"]
        spec = tmpl["spec"]
        ports = {p["name"]: p["containerPort"] for c in spec["containers"] + spec.get("initContainers", [])
                 for p in c.get("ports", []) if "name" in p}
        name, n = o["metadata"]["name"], 1
        if o["kind"] == "Job" and o["spec"].get("completionMode") == "Indexed":
            n = o["spec"].get("completions", 1)
        for i in range(n):
            pods.append(Pod(name if n == 1 else f"{name}-{i}", ns, dict(tmpl["metadata"].get("labels", {})),
                            {**namespaces.get(ns, {}), "kubernetes.io/metadata.name": ns}, ports))
    return pods


def bystanders(namespace: str) -> list[Pod]:
    return [Pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"}),
            Pod("stranger", "elsewhere", {"app": "other"}, {"kubernetes.io/metadata.name": "elsewhere"}),
            Pod("neighbour", namespace, {"app": "other"}, {"kubernetes.io/metadata.name": namespace})]


def allowed_paths(objects: list[dict]) -> set[tuple[str, str, int, str]]:
    """Every (from, to, port, protocol) the policies allow where one end is a workload's pod."""
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = workload_pods(objects)
    ours = {p.name for p in pods}
    namespace = pods[0].namespace if pods else "default"
    every = pods + bystanders(namespace)
    ports = {(OTHER_PORT, "TCP"), (OTHER_PORT, "UDP")}
    for p in policies:
        for rule in (p["spec"].get("ingress") or []) + (p["spec"].get("egress") or []):
            for q in rule.get("ports") or []:
                if isinstance(q.get("port"), int):
                    ports.add((q["port"], q.get("protocol", "TCP")))
    out = set()
    for src in every:
        for dst in every:
            if src is dst or (src.name not in ours and dst.name not in ours):
                continue
            for port, proto in ports:
                if allowed(policies, src, dst, port, proto):
                    out.add((src.name, dst.name, port, proto))
    return out
