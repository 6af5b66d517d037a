"""One contract every registered algorithm keeps (geotrain.worker.algorithms), through a real coordinator.

Two sites (threads, one worker each) train a small linear model with a known fake gradient against
an in-process gRPC coordinator on port 0, until ``round`` reaches N. The contract, checked by
:func:`contract_problems`:

- the loop ends with ``round == N`` on every site, and the coordinator committed;
- the leader emitted at least N ``merge`` events, each with the fields of docs/events.md;
- a step that returns True (a merge taken into the model) leaves a non-overlapped algorithm's model
  equal to its global copy;
- after ``fetch_global`` of the coordinator's version, every site holds the same global parameters, bit for bit;
- ``close()`` finishes in-flight work, may be called again, and once every site closed no background
  exchange thread is left.

A test-only algorithm (plain periodic averaging) is registered with one line and keeps the same
contract; a broken one (it counts rounds but never merges) is caught.
"""

from __future__ import annotations

import threading

import pytest
import torch

from geotrain.config.components import WorkerConfig
from geotrain.config.topology import OuterOptimizerConfig
from geotrain.events import EventLog
from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
from geotrain.orchestrator.server import create_server
from geotrain.sdk import DiLoCo, SiteContext
from geotrain.wire.transport import flatten
from geotrain.worker.algorithms import ALGORITHMS, Algorithm

SITES = ("a", "b")
ROUNDS = 3
MERGE_FIELDS = {"site", "round", "bytes_sent", "bytes_received", "seconds", "step"}
POOL_THREADS = ("stream", "async")  # thread name prefixes of the algorithms' background exchanges


class PeriodicAverage(Algorithm):
    """Test-only: every H steps the sites' parameters are averaged. It sends θ_global − θ_site through
    the star; with an outer lr of 1 and no momentum the coordinator's answer is the sites' mean."""

    name = "periodic-average"

    def due(self) -> bool:
        return self.local_step % self.H == 0

    def sync(self) -> bool:
        self.round, _ = self.exchange_whole(base_version=self.round)
        return True


class CountsButNeverMerges(Algorithm):
    """Test-only and broken: it says its rounds are done without merging anything."""

    name = "counts-but-never-merges"

    def due(self) -> bool:
        return self.local_step % self.H == 0

    def sync(self) -> bool:
        self.round += 1
        return False


AVERAGING = OuterOptimizerConfig(lr=1.0, momentum=0.0, nesterov=False)

# name -> (H, the coordinator's settings, the sites' settings)
CASES = {
    "diloco": (3, {}, {}),
    "ddp": (2, {"algorithm": "ddp"}, {}),
    "async-diloco": (3, {"algorithm": "async-diloco"}, {}),
    "async-diloco/overlap": (3, {"algorithm": "async-diloco"}, {"overlap_steps": 1}),
    "streaming-diloco": (4, {"algorithm": "streaming-diloco", "fragments": 2}, {"fragments": 2, "overlap_steps": 1}),
    "streaming-diloco/no-overlap": (4, {"algorithm": "streaming-diloco", "fragments": 2}, {"fragments": 2}),
    "diloco/int8": (3, {"codec": "int8", "block": 4}, {"codec": "int8", "block": 4}),
    "periodic-average": (2, {"outer": AVERAGING}, {}),
    "counts-but-never-merges": (2, {}, {}),
}


class Recorder(EventLog):
    def __init__(self):
        super().__init__(None, "test")
        self.seen: list[tuple[str, dict]] = []

    def emit(self, event, **fields):
        self.seen.append((event, fields))
        return {}


def fake_grad(site: int, step: int, w: torch.Tensor) -> torch.Tensor:
    return 0.05 * (site + 1) * (step % 3 + 1) * torch.ones_like(w) + 0.1 * w


def run_sites(case: str) -> dict:
    """Train both sites to ROUNDS rounds; what each saw, for :func:`contract_problems`."""
    algorithm = case.split("/")[0]
    H, coordinator, settings = CASES[case]
    engine = CoordinatorEngine(EngineConfig(sites=SITES, **coordinator))
    server, port = create_server(engine)
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    out, errors = {}, []
    joined, done = threading.Barrier(len(SITES), timeout=60), threading.Barrier(len(SITES), timeout=60)

    def site(i: int, name: str) -> None:
        try:
            lin = torch.nn.Linear(3, 4, bias=False)
            with torch.no_grad():
                lin.weight.copy_(w0)
            opt = torch.optim.SGD(lin.parameters(), lr=0.1)
            events = Recorder()
            ctx = SiteContext(run="t", site=name, rank=0, workers=1, coordinator=f"127.0.0.1:{port}",
                              config=WorkerConfig(rounds=ROUNDS, **settings))
            if i == 1:
                threading.Event().wait(0.3)  # site a provides the initial model
            dl = DiLoCo(lin, opt, inner_steps=H, algorithm=algorithm, context=ctx, events=events)
            joined.wait()  # both sites are members before either trains: each takes part from round 0
            seen = {"not_global_after_merge": [], "locals_at_merge": []}
            step = 0
            while dl.round < ROUNDS and step < 4 * ROUNDS * H:
                lin.weight.grad = fake_grad(i, step, lin.weight.detach())
                opt.step()
                before = flatten(dl.params).clone()
                if dl.step():
                    seen["locals_at_merge"].append(before)
                    if not dl.overlapped and not torch.equal(flatten(dl.params), dl.global_flat):
                        seen["not_global_after_merge"].append(step)
                step += 1
            seen["round"] = dl.round
            done.wait()  # every site's merges are in: fetch the coordinator's newest version
            version = engine.version
            seen["fetched"], seen["expected_version"] = dl.fetch_global(version), version
            seen["global"] = dl.global_flat.clone()
            dl.close()
            dl.close()  # again: nothing left to do, nothing raised
            seen["events"] = events.seen
            out[name] = seen
        except Exception as exc:  # surfaced below
            errors.append(exc)
            joined.abort()
            done.abort()

    threads = [threading.Thread(target=site, args=(i, s)) for i, s in enumerate(SITES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    server.stop(0)
    assert not errors, errors
    out["threads_after_close"] = [t.name for t in threading.enumerate() if t.name.startswith(POOL_THREADS)]
    return out


def contract_problems(out: dict) -> list[str]:
    """What in a run breaks the contract (empty: kept)."""
    problems = []
    for name in SITES:
        seen = out[name]
        if seen["round"] != ROUNDS:
            problems.append(f"{name}: round {seen['round']}, expected {ROUNDS}")
        merges = [fields for event, fields in seen["events"] if event == "merge"]
        if len(merges) < ROUNDS:
            problems.append(f"{name}: {len(merges)} merge events for {ROUNDS} rounds")
        for fields in merges:
            if not MERGE_FIELDS <= set(fields):
                problems.append(f"{name}: a merge event lacks {sorted(MERGE_FIELDS - set(fields))}")
        if seen["not_global_after_merge"]:
            problems.append(f"{name}: after the merges of steps {seen['not_global_after_merge']} the model is "
                            f"not the global model")
        if seen["fetched"] != seen["expected_version"]:
            problems.append(f"{name}: fetch_global gave version {seen['fetched']}, the coordinator is at "
                            f"{seen['expected_version']}")
    if out["threads_after_close"]:
        problems.append(f"threads left after close(): {out['threads_after_close']}")
    if not torch.equal(out[SITES[0]]["global"], out[SITES[1]]["global"]):
        problems.append("the sites hold different global parameters")
    return problems


def with_test_algorithms(monkeypatch) -> None:
    monkeypatch.setitem(ALGORITHMS, PeriodicAverage.name, PeriodicAverage)  # the one line a new algorithm needs


def test_every_registered_algorithm_has_a_contract_case():
    assert set(ALGORITHMS) <= {case.split("/")[0] for case in CASES}


@pytest.mark.parametrize("case", [c for c in CASES if c.split("/")[0] in ALGORITHMS])
def test_registered_algorithms_keep_the_contract(case):
    assert contract_problems(run_sites(case)) == []


def test_a_new_algorithm_registered_with_one_line_keeps_the_contract(monkeypatch):
    with_test_algorithms(monkeypatch)
    out = run_sites("periodic-average")
    assert contract_problems(out) == []
    # and it averages: the global model after each merge is the mean of the sites' local models
    for a_local, b_local, merge in zip(out["a"]["locals_at_merge"], out["b"]["locals_at_merge"],
                                       [f for e, f in out["a"]["events"] if e == "merge"]):
        assert merge["version"] == merge["round"] + 1
    assert torch.allclose(out["a"]["global"], (out["a"]["locals_at_merge"][-1] + out["b"]["locals_at_merge"][-1]) / 2,
                          atol=1e-6, rtol=0)


def test_the_contract_catches_an_algorithm_that_never_merges(monkeypatch):
    monkeypatch.setitem(ALGORITHMS, CountsButNeverMerges.name, CountsButNeverMerges)
    problems = contract_problems(run_sites("counts-but-never-merges"))
    assert problems == [f"{name}: 0 merge events for {ROUNDS} rounds" for name in SITES]


def test_an_unregistered_name_is_refused_with_the_registered_ones():
    from geotrain.errors import GeotrainError
    from geotrain.worker.algorithms import algorithm_class

    with pytest.raises(GeotrainError, match="periodic-average.*expected one of diloco, ddp"):
        algorithm_class("periodic-average")


def _kept() -> dict:
    """A run that keeps the contract, written by hand (for the checker's own tests)."""
    merge = {"site": "a", "round": 0, "bytes_sent": 1, "bytes_received": 1, "seconds": 0.0, "step": 2}
    return {"threads_after_close": [], **{
        name: {"round": ROUNDS, "events": [("merge", dict(merge, site=name))] * ROUNDS, "not_global_after_merge": [],
               "fetched": 3, "expected_version": 3, "global": torch.ones(3)} for name in SITES}}


@pytest.mark.parametrize("breakage, expected", [
    (lambda o: o["a"].update(round=ROUNDS - 1), "a: round 2, expected 3"),
    (lambda o: o["b"]["events"].pop(), "b: 2 merge events for 3 rounds"),
    (lambda o: o["a"]["events"].append(("merge", {"site": "a"})), "a: a merge event lacks"),
    (lambda o: o["a"].update(not_global_after_merge=[5]), "the model is not the global model"),
    (lambda o: o.update(threads_after_close=["stream_0"]), "threads left after close(): ['stream_0']"),
    (lambda o: o["a"].update(fetched=None), "a: fetch_global gave version None"),
    (lambda o: o["b"].update({"global": torch.zeros(3)}), "the sites hold different global parameters"),
])
def test_the_contract_checker_fails_each_broken_run(breakage, expected):
    out = _kept()
    assert contract_problems(out) == []
    breakage(out)
    problems = contract_problems(out)
    assert len(problems) == 1 and expected in problems[0], problems
