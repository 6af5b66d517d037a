"""The chaos suite's harness: one Compose deployment per scenario, its recorded history, the report.

A :class:`Deployment` renders a topology with ``geotrain compose`` (one container per part, on one
internal network), brings it up under a project name of its own, waits for the sites to finish,
runs ``geotrain check --json`` on the shared run directory (a host directory bind-mounted at
/run in every container) and always tears down with ``docker-compose down -v``. A failing
scenario keeps its artifacts (``docker-compose logs``, metrics.jsonl, the rendered manifests,
worker logs, check output) under ``$RESULTS_DIR/<scenario>/``.

History helpers read ``metrics.jsonl`` (docs/events.md) only: rounds completed, rounds lost and
recovery time around a fault are computed from recorded events, never from "it did not crash".
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from geotrain.run.compose import OFFLINE_IMAGE, site_service, write_deployment
from geotrain.events import EventLog, read_events
from geotrain.config.topology import Topology, load_topology

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "topologies" / "demo.yaml"

# The chaos topology: the demo's two sites, one worker each, made small and slow enough that a
# fault lands mid-run: each inner step is stretched 25x (a sleep: cheap on two cores), so a round
# takes about a second and a run about half a minute. A round commits without a site after 8 s
# (round_timeout_s) with whoever reported (min_sites 1), so a dead site does not stop the run.
# One worker per site keeps the suite cheap on two cores.
CHAOS_SETTINGS = (
    "sites[0].workers=1", "sites[1].workers=1", "sites[0].slowdown=25", "sites[1].slowdown=25",
    "training.rounds=20", "training.inner_steps=4", "training.batch_size=8", "training.eval_batches=2",
    "training.round_timeout_s=8", "recovery.min_sites=1", "recovery.retry_deadline_s=90",
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "data.max_bytes=200000",
    "links.default.latency=10ms", "links.default.jitter=0ms", "checkpoint.every_rounds=2",
)

PROJECT_PREFIX = "gtchaos"
_SEED: list[int] = []


def chaos_seed() -> int:
    """The exploratory scenario's seed: $CHAOS_SEED, or drawn once per session (printed in the header)."""
    if not _SEED:
        env = os.environ.get("CHAOS_SEED")
        _SEED.append(int(env) if env else random.SystemRandom().randrange(1, 2**31))
    return _SEED[0]


def results_dir() -> Path:
    path = Path(os.environ.get("RESULTS_DIR") or REPO / "tests" / "chaos" / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def chaos_topology(extra: tuple[str, ...] = ()) -> tuple[Topology, tuple[str, ...]]:
    settings = CHAOS_SETTINGS + tuple(extra)
    return load_topology(DEMO, list(settings)), settings


class ScenarioFailed(AssertionError):
    """A scenario's expectation did not hold; the message carries the evidence."""


@dataclass
class Deployment:
    """One scenario's Compose project: render, up, watch, check, collect, down."""

    scenario: str
    project: str
    workdir: Path
    topo: Topology
    client: object  # docker.DockerClient
    image: str = OFFLINE_IMAGE
    offline: bool = True
    compose_file: Path = field(init=False)
    run_dir: Path = field(init=False)
    chaos: EventLog = field(init=False)
    up_s: float | None = None

    def __post_init__(self) -> None:
        self.run_dir = self.workdir / "run"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Healthchecks every second: the deployment is up a few seconds sooner (Compose v1 waits
        # for each `service_healthy` in turn), for a little CPU.
        self.compose_file = write_deployment(self.topo, self.workdir, source=f"{DEMO} + chaos settings", image=self.image,
                                             offline=self.offline, run_dir=self.run_dir, health_interval_s=1.0)
        self.chaos = EventLog(self.run_dir / "metrics.jsonl", "chaos")

    # ---- docker-compose ----
    def compose(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["docker-compose", "-f", str(self.compose_file), "-p", self.project, "--ansi", "never", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.workdir)
        if check and r.returncode != 0:
            raise ScenarioFailed(f"`{' '.join(cmd)}` exited {r.returncode}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
        return r

    def up(self) -> None:
        t0 = time.monotonic()
        self.chaos.emit("run_started", run=self.topo.name, topology_sha256=self.topo.digest(), sites=self.topo.site_names,
                        algorithm=self.topo.training.algorithm, deployment=self.project)
        self.compose("up", "-d", timeout=240)
        self.up_s = time.monotonic() - t0

    def down(self) -> None:
        """Remove every container, the network and the volumes of this project (never raises)."""
        try:
            # The history is read already: no need for graceful stops.
            self.compose("kill", timeout=60, check=False)
            self.compose("down", "-v", "--remove-orphans", "-t", "1", timeout=120, check=False)
        except Exception:  # noqa: BLE001 - the sweep below still runs
            pass
        sweep(self.client, self.project)

    # ---- containers ----
    def container(self, service: str):
        found = self.client.containers.list(all=True, filters={"label": [f"com.docker.compose.project={self.project}",
                                                                          f"com.docker.compose.service={service}"]})
        if not found:
            raise ScenarioFailed(f"{self.project}: no container for service {service!r}")
        return found[0]

    def network(self):
        return self.client.networks.get(f"{self.project}_wan")

    def site_exit_codes(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for s in self.topo.site_names:
            c = self.container(site_service(s))
            c.reload()
            out[s] = c.attrs["State"]["ExitCode"] if c.status == "exited" else None
        return out

    def wait_sites_exit(self, timeout_s: float) -> dict[str, int | None]:
        deadline = time.monotonic() + timeout_s
        while True:
            codes = self.site_exit_codes()
            if all(c is not None for c in codes.values()) or time.monotonic() > deadline:
                return codes
            time.sleep(1.0)

    # ---- history ----
    def events(self) -> list[dict]:
        return read_events(self.run_dir / "metrics.jsonl")

    def wait_for(self, predicate, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for e in self.events():
                if predicate(e):
                    return e
            time.sleep(0.25)
        raise ScenarioFailed(f"{self.scenario}: no {what} within {timeout_s:.0f}s")

    def check(self) -> dict:
        """``geotrain check RUN_DIR --json`` (exit 0: nothing violated)."""
        r = subprocess.run([sys.executable, "-m", "geotrain.cli", "check", str(self.run_dir), "--json"],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
        try:
            doc = json.loads(r.stdout)
        except json.JSONDecodeError:
            doc = {"ok": False, "verdicts": [], "error": (r.stdout + r.stderr)[-2000:]}
        doc["exit_code"] = r.returncode
        (self.workdir / "check.json").write_text(json.dumps(doc, indent=2))
        return doc

    def save_artifacts(self, dest: Path) -> Path:
        """Keep what explains a failure: compose logs, container states, history, manifests, logs."""
        dest.mkdir(parents=True, exist_ok=True)
        try:
            r = self.compose("logs", "--no-color", "--timestamps", timeout=60, check=False)
            (dest / "docker-compose.logs").write_text(r.stdout + r.stderr)
        except Exception as exc:  # noqa: BLE001
            (dest / "docker-compose.logs").write_text(f"could not read the logs: {exc}\n")
        try:
            states = {c.name: c.attrs["State"] for c in self.client.containers.list(
                all=True, filters={"label": f"com.docker.compose.project={self.project}"})}
            (dest / "containers.json").write_text(json.dumps(states, indent=2, default=str))
        except Exception:  # noqa: BLE001
            pass
        for name in ("docker-compose.yml", "topology.yaml", "check.json"):
            if (self.workdir / name).exists():
                shutil.copy2(self.workdir / name, dest / name)
        states = [f"coordinator/{p.name}" for p in (self.run_dir / "coordinator").glob("state*.json")]
        for sub in ("metrics.jsonl", "logs", "links", *states):  # the coordinator's state metadata (orchestrator/persist.py)
            src = self.run_dir / sub
            target = dest / "run" / sub
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            elif src.exists():
                shutil.copy2(src, target)
        ckpts = self.run_dir / "checkpoints"
        if ckpts.is_dir():  # the manifests, not the tensors
            for m in ckpts.rglob("manifest.json"):
                t = dest / "run" / m.relative_to(self.run_dir)
                t.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(m, t)
        return dest


def sweep(client, project_prefix: str) -> list[str]:
    """Remove containers, networks and volumes whose compose project starts with ``project_prefix``."""
    removed: list[str] = []
    label = "com.docker.compose.project"
    for c in client.containers.list(all=True, filters={"label": label}):
        if c.labels.get(label, "").startswith(project_prefix):
            try:
                c.remove(force=True, v=True)
                removed.append(c.name)
            except Exception:  # noqa: BLE001
                pass
    for n in client.networks.list(filters={"label": label}):
        if n.attrs.get("Labels", {}).get(label, "").startswith(project_prefix):
            try:
                n.remove()
                removed.append(n.name)
            except Exception:  # noqa: BLE001
                pass
    for v in client.volumes.list(filters={"label": label}):
        if (v.attrs.get("Labels") or {}).get(label, "").startswith(project_prefix):
            try:
                v.remove(force=True)
                removed.append(v.name)
            except Exception:  # noqa: BLE001
                pass
    return removed


# ---- reading a history ----------------------------------------------------------------------------


def commits(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("event") == "commit"]


def rounds_completed(events: list[dict]) -> int:
    return len({e.get("round") for e in commits(events)})


def fault_window(events: list[dict]) -> tuple[dict | None, dict | None]:
    """The first fault_injected event and the fault_healed that follows it."""
    inj = next((e for e in events if e.get("event") == "fault_injected"), None)
    if inj is None:
        return None, None
    healed = next((e for e in events if e.get("event") == "fault_healed" and e["t"] >= inj["t"]), None)
    return inj, healed


def recovery(events: list[dict], sites: list[str], target_site: str | None) -> tuple[float | None, int]:
    """(recovery seconds, rounds lost) around the first fault.

    Recovery: from the moment the fault was healed to the first commit after it that includes the
    target site (a site fault) or any commit (a fault of the coordinator, etcd or a link).
    Rounds lost: commits between the injection and that commit that lack a site, plus rounds that
    failed in that window.
    """
    inj, healed = fault_window(events)
    if inj is None:
        return None, 0
    start = healed["t"] if healed else inj["t"]
    back = next((e for e in commits(events) if e["t"] >= start and (target_site is None or target_site in e.get("sites", []))),
                None)
    end = back["t"] if back else float("inf")
    lost = sum(1 for e in commits(events) if inj["t"] <= e["t"] < end and set(e.get("sites", [])) != set(sites))
    lost += sum(1 for e in events if e.get("event") == "round_failed" and inj["t"] <= e["t"] < end)
    return (round(back["t"] - start, 2) if back else None), lost


def history_notes(events: list[dict]) -> str:
    """What else the history shows: sites dropped from a round, updates refused, worker restarts,
    coordinator incarnations."""
    count = lambda pred: sum(1 for e in events if pred(e))  # noqa: E731
    parts = []
    dropped = count(lambda e: e.get("event") == "failure" and e.get("what") == "site")
    refused = count(lambda e: e.get("event") == "merge_refused")
    workers = count(lambda e: e.get("event") == "failure" and e.get("what") == "worker")
    coords = count(lambda e: e.get("event") == "coordinator_started")
    if dropped:
        parts.append(f"{dropped} site drops")
    if refused:
        parts.append(f"{refused} updates refused")
    if workers:
        parts.append(f"{workers} worker restarts")
    if coords > 1:
        parts.append(f"{coords} coordinator incarnations")
    return ", ".join(parts)


def invariants_summary(check: dict) -> str:
    verdicts = check.get("verdicts") or []
    if not verdicts:
        return f"check failed: {check.get('error', 'no verdicts')[:80]}"
    by = {"held": [], "violated": [], "unknown": []}
    for v in verdicts:
        by.setdefault(v["status"], []).append(v["invariant"])
    text = f"{len(by['held'])} held"
    if by["violated"]:
        text += f", VIOLATED: {', '.join(by['violated'])}"
    if by["unknown"]:
        text += f", unknown: {', '.join(by['unknown'])}"
    return text


# ---- the report -----------------------------------------------------------------------------------


@dataclass
class ReportRow:
    scenario: str
    faults: str
    result: str = "?"
    rounds_completed: int | str = "-"
    rounds_lost: int | str = "-"
    recovery_s: float | str = "-"
    invariants: str = "-"
    wall_s: float | str = "-"
    notes: str = ""


class Report:
    """The suite's markdown table, rewritten after every scenario so a cut-short session keeps its rows."""

    HEADER = ("scenario", "faults", "result", "rounds completed", "rounds lost", "recovery s", "invariants (geotrain check)",
              "wall s", "notes")

    def __init__(self, path: Path, preamble: str):
        self.path = path
        self.preamble = preamble
        self.rows: list[ReportRow] = []

    def add(self, row: ReportRow) -> None:
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        lines = [self.preamble.rstrip(), "", "| " + " | ".join(self.HEADER) + " |",
                 "|" + "---|" * len(self.HEADER)]
        for r in self.rows:
            cells = [r.scenario, r.faults, r.result, r.rounds_completed, r.rounds_lost, r.recovery_s, r.invariants,
                     r.wall_s, r.notes]
            lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
        self.path.write_text("\n".join(lines) + "\n")
