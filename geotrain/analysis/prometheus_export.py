"""A Prometheus ``/metrics`` endpoint for the coordinator, fed by a run's events (geotrain.analysis.exporters).

:class:`PrometheusExporter` counts rounds, round wait, merge seconds, WAN bytes per site and per
link, live sites, staleness, failures and recoveries. Feed it events with
:meth:`PrometheusExporter.observe`, or let it tail a metrics.jsonl with
:meth:`PrometheusExporter.follow`. Needs the ``prometheus-client`` package.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

from geotrain.events import EventTail, number

log = logging.getLogger(__name__)


def _prometheus():
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the Prometheus endpoint needs the 'prometheus-client' package: "
                          "pip install prometheus-client") from exc
    return prometheus_client


class _LinkBytesCollector:
    """geotrain_link_bytes_total{link,direction}: totals the link proxies report (set, not added)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[tuple[str, str], float] = {}

    def set(self, link: str, forward: float, backward: float) -> None:
        with self._lock:
            self._bytes[(link, "forward")] = float(forward)
            self._bytes[(link, "backward")] = float(backward)

    def describe(self):
        return [self._family()]

    def collect(self):
        family = self._family()
        with self._lock:
            for (link, direction), value in sorted(self._bytes.items()):
                family.add_metric([link, direction], value)
        yield family

    @staticmethod
    def _family():
        from prometheus_client.core import CounterMetricFamily

        return CounterMetricFamily("geotrain_link_bytes",
                                   "Bytes carried by each emulated WAN link; forward is site -> coordinator.",
                                   labels=["link", "direction"])


# Round waits span a LAN round (tens of ms) to a slow WAN round with a straggler (minutes).
ROUND_WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class PrometheusExporter:
    """Serves /metrics on a port (0 = ephemeral) for the coordinator.

    Every exporter has its own ``CollectorRegistry`` (``self.registry``), so several can live in
    one process. Metrics (label names in braces):

    - ``geotrain_rounds_committed_total``: ``commit`` events (one per fragment in streaming-diloco);
    - ``geotrain_round``, ``geotrain_global_version``: round and version of the latest commit;
    - ``geotrain_round_wait_seconds``: histogram of ``commit`` ``wait_s``;
    - ``geotrain_live_sites``: sites taking part: those of the latest commit (diloco,
      streaming-diloco, ddp); with asynchronous commits (one site each, marked by a ``weight``
      field) the distinct sites of the last N commits, N = the run's sites. A ``failure`` of
      ``what=site`` removes its target until it contributes or recovers again; ``site_joined``
      and a ``recovery`` of a site add it;
    - ``geotrain_merge_seconds{site}``: seconds of the site's latest ``merge``;
    - ``geotrain_wan_bytes_total{site,direction}``: merge bytes, ``direction`` = sent | received;
    - ``geotrain_link_bytes_total{link,direction}``: set by :meth:`set_link_bytes`;
    - ``geotrain_staleness{site}``: the ``staleness`` of the latest commit/merge naming the site
      that carries one (a number, or on a commit a {site: n} mapping); 0 until one does (an event
      without the field never overwrites a value: async-diloco puts it on the commit only);
    - ``geotrain_eval_loss``: loss of the latest ``eval``;
    - ``geotrain_failures_total{what}``, ``geotrain_recoveries_total{what}``: events, as in summary.json
      (one death may be reported by several processes: the launcher and each site leader),
      ``geotrain_recovery_seconds{what}`` (the latest recovery's seconds);
    - ``geotrain_rounds_failed_total``, ``geotrain_merges_refused_total{action}``,
      ``geotrain_faults_injected_total{fault}``.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1"):
        pc = _prometheus()
        self.host = host
        self.port = int(port)
        self.registry = pc.CollectorRegistry()
        r = self.registry
        self.rounds_committed = pc.Counter("geotrain_rounds_committed", "Rounds committed by the coordinator.",
                                           registry=r)
        self.round = pc.Gauge("geotrain_round", "Round of the latest commit.", registry=r)
        self.global_version = pc.Gauge("geotrain_global_version", "Global model version after the latest commit.",
                                       registry=r)
        self.round_wait = pc.Histogram("geotrain_round_wait_seconds",
                                       "Seconds the coordinator waited from the first contribution to the commit.",
                                       buckets=ROUND_WAIT_BUCKETS, registry=r)
        self.live_sites = pc.Gauge("geotrain_live_sites", "Sites taking part in the latest rounds.", registry=r)
        self.merge_seconds = pc.Gauge("geotrain_merge_seconds", "Seconds of the site's latest merge (WAN exchange).",
                                      ["site"], registry=r)
        self.wan_bytes = pc.Counter("geotrain_wan_bytes", "Bytes a site exchanged with the coordinator in merges.",
                                    ["site", "direction"], registry=r)
        self.staleness = pc.Gauge("geotrain_staleness", "Global versions the site's latest contribution was behind.",
                                  ["site"], registry=r)
        self.eval_loss = pc.Gauge("geotrain_eval_loss", "Loss of the latest evaluation.", registry=r)
        self.script_metric = pc.Gauge("geotrain_script_metric", "Latest value of a script's own scalar "
                                      "(DiLoCo.log, DiLoCo.log_eval as eval/<name>), by name and site.",
                                      ["name", "site"], registry=r)
        self._script_series: set[tuple[str, str]] = set()
        self.failures = pc.Counter("geotrain_failures", "Failures detected, by what failed.", ["what"], registry=r)
        self.recoveries = pc.Counter("geotrain_recoveries", "Recoveries completed, by what recovered.", ["what"],
                                     registry=r)
        self.recovery_seconds = pc.Gauge("geotrain_recovery_seconds", "Seconds the latest recovery took.", ["what"],
                                         registry=r)
        self.rounds_failed = pc.Counter("geotrain_rounds_failed", "Rounds the coordinator gave up on.", registry=r)
        self.merges_refused = pc.Counter("geotrain_merges_refused", "Contributions the coordinator refused.",
                                         ["action"], registry=r)
        self.faults_injected = pc.Counter("geotrain_faults_injected", "Faults injected by geotrain chaos.", ["fault"],
                                          registry=r)
        self._links = _LinkBytesCollector()
        r.register(self._links)
        self._state = threading.Lock()  # observe() may run in the follower and in the caller at once
        self._run_sites: set[str] = set()  # every site of the run we heard of
        self._live: set[str] = set()
        self._async_recent: deque[str] = deque()  # contributors of the latest asynchronous commits
        self._stale_sites: set[str] = set()  # sites whose staleness series exists
        self._server = None
        self._thread: threading.Thread | None = None
        self._follow_stop = threading.Event()
        self._follow_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- serving ------------------------------------------------------------------------------

    def start(self) -> int:
        """Serve /metrics in a daemon thread; returns the port (the real one where port was 0)."""
        with self._lock:
            if self._server is None:
                pc = _prometheus()
                self._server, self._thread = pc.start_http_server(self.port, addr=self.host, registry=self.registry)
                self.port = self._server.server_port
            return self.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop following and serving, and free the port; idempotent."""
        self._follow_stop.set()
        if self._follow_thread is not None:
            self._follow_thread.join(timeout=10)
            self._follow_thread = None
        with self._lock:
            server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=10)

    def __enter__(self) -> PrometheusExporter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- feeding ------------------------------------------------------------------------------

    def observe(self, event: dict) -> None:
        """Update the metrics from one event (a dict as in metrics.jsonl); other kinds are ignored."""
        if not isinstance(event, dict):
            return
        with self._state:
            self._observe(event)

    def _observe(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "commit":
            self._commit(event)
        elif kind == "merge":
            self._merge(event)
        elif kind in ("run_started", "coordinator_started"):
            if isinstance(event.get("sites"), list):
                self._run_sites.update(str(s) for s in event["sites"])
        elif kind == "site_joined" and event.get("site"):
            self._run_sites.add(str(event["site"]))
            self._set_live(self._live | {str(event["site"])})
        elif kind == "eval":
            loss = number(event.get("loss"))
            if loss is not None:
                if event.get("metric"):
                    self._script_metric(f"eval/{event['metric']}", str(event.get("site") or ""), loss)
                else:
                    self.eval_loss.set(loss)
        elif kind == "metric" and not event.get("rank"):
            from geotrain.worker.metrics import scalars_of

            for name, value in scalars_of(event).items():
                v = number(value)
                if v is not None:
                    self._script_metric(name, str(event.get("site") or ""), v)
        elif kind == "failure":
            what = str(event.get("what") or "unknown")
            self.failures.labels(what=what).inc()
            if what == "site" and event.get("target"):
                target = str(event["target"])
                self._async_recent = deque(s for s in self._async_recent if s != target)
                self._set_live(self._live - {target})
        elif kind == "recovery":
            what = str(event.get("what") or "unknown")
            self.recoveries.labels(what=what).inc()
            if what == "site" and event.get("target"):
                self._set_live(self._live | {str(event["target"])})
            seconds = number(event.get("seconds"))
            if seconds is not None:
                self.recovery_seconds.labels(what=what).set(seconds)
        elif kind == "round_failed":
            self.rounds_failed.inc()
        elif kind == "merge_refused":
            self.merges_refused.labels(action=str(event.get("action") or "unknown")).inc()
        elif kind == "fault_injected":
            self.faults_injected.labels(fault=str(event.get("fault") or "unknown")).inc()

    MAX_SCRIPT_METRICS = 256
    """Distinct (name, site) series of scripts' own scalars; more are dropped (label cardinality is bounded)."""

    def _script_metric(self, name: str, site: str, value: float) -> None:
        key = (name, site)
        if key not in self._script_series and len(self._script_series) >= self.MAX_SCRIPT_METRICS:
            return
        self._script_series.add(key)
        self.script_metric.labels(name=name, site=site).set(value)

    def observe_all(self, events: Iterable[dict]) -> None:
        for event in events:
            self.observe(event)

    def set_link_bytes(self, link: str, forward: int, backward: int) -> None:
        """Record the byte totals a WAN link proxy reports (LinkProxy.stats(), links/*.json)."""
        self._links.set(str(link), forward, backward)

    def follow(self, metrics_path: str | os.PathLike, interval_s: float = 1.0) -> None:
        """Observe the events appended to ``metrics_path`` (from its start) in a daemon thread until stop()."""
        if self._follow_thread is not None:
            raise RuntimeError("already following a metrics file")
        tail = EventTail(metrics_path)
        self._follow_stop.clear()

        def loop() -> None:
            while True:
                stopping = self._follow_stop.is_set()  # one more read after stop(): what came before it
                for event in tail.read():
                    try:
                        self.observe(event)
                    except Exception:  # a metrics endpoint must not die of one odd event
                        log.exception("prometheus exporter: cannot observe %r", event)
                if stopping:
                    return
                self._follow_stop.wait(interval_s)

        self._follow_thread = threading.Thread(target=loop, name="geotrain-prometheus-follow", daemon=True)
        self._follow_thread.start()

    # -- per kind -----------------------------------------------------------------------------

    def _commit(self, e: dict) -> None:
        self.rounds_committed.inc()
        rnd, version, wait_s = number(e.get("round")), number(e.get("version")), number(e.get("wait_s"))
        if rnd is not None:
            self.round.set(rnd)
        if version is not None:
            self.global_version.set(version)
        if wait_s is not None:
            self.round_wait.observe(wait_s)
        sites = e.get("sites")
        if isinstance(sites, list):
            sites = [str(s) for s in sites]
            self._run_sites.update(sites)
            if "weight" in e:  # asynchronous: one contribution per commit
                self._async_recent.extend(sites)
                while len(self._async_recent) > max(1, len(self._run_sites)):
                    self._async_recent.popleft()
                self._set_live(set(self._async_recent))
            else:
                self._async_recent.clear()
                self._set_live(set(sites))
            staleness = e.get("staleness")
            for site in sites:
                self._set_staleness(site, staleness.get(site) if isinstance(staleness, dict) else staleness)

    def _merge(self, e: dict) -> None:
        site = str(e.get("site") or str(e.get("proc", "unknown")).split("/")[0])
        seconds = number(e.get("seconds"))
        if seconds is not None:
            self.merge_seconds.labels(site=site).set(seconds)
        for key, direction in (("bytes_sent", "sent"), ("bytes_received", "received")):
            n = number(e.get(key))
            if n is not None and n >= 0:
                self.wan_bytes.labels(site=site, direction=direction).inc(n)
        self._set_staleness(site, e.get("staleness"))

    def _set_staleness(self, site: str, value: Any) -> None:
        v = number(value)
        if v is not None:
            self.staleness.labels(site=site).set(v)
            self._stale_sites.add(site)
        elif site not in self._stale_sites:  # absent: 0, but never over a value an event gave
            self.staleness.labels(site=site).set(0.0)
            self._stale_sites.add(site)

    def _set_live(self, live: set[str]) -> None:
        self._live = live
        self.live_sites.set(len(live))
