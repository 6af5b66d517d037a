"""The fault scheduler and failpoints, against a fake environment (no processes)."""

import json
import signal

import pytest

from geotrain.run import faults
from geotrain.events import EventLog, read_events
from geotrain.config.topology import parse_topology


class FakeEnv:
    def __init__(self, tmp_path):
        self.run_dir = tmp_path
        self.checkpoint_dir = tmp_path / "checkpoints"
        self.signals = []

    def pids(self, target):
        return [111, 222] if target.startswith("site") else [333]

    def link_control_file(self, site):
        (self.run_dir / "links").mkdir(exist_ok=True)
        return self.run_dir / "links" / f"{site}.control.json"


def topo(*fault_list):
    return parse_topology({"name": "x", "sites": [{"name": "a", "workers": 2}, {"name": "b", "workers": 1}],
                           "faults": list(fault_list)})


@pytest.fixture
def env(tmp_path, monkeypatch):
    e = FakeEnv(tmp_path)
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: e.signals.append((pid, sig)))
    return e


def scheduler(env, t):
    return faults.FaultScheduler(env, t, EventLog(env.run_dir / "metrics.jsonl", "launcher"), started_at=1000.0)


def test_triggers_round_step_and_time(env):
    s = scheduler(env, topo({"kind": "kill", "target": "worker a/1", "at_round": 2},
                            {"kind": "kill", "target": "coordinator", "at_step": 15},
                            {"kind": "kill", "target": "etcd", "at": "30s"}))
    s.tick(now=1001)
    assert env.signals == []
    s.observe({"event": "commit", "round": 1})          # two rounds committed
    s.tick(now=1002)
    assert env.signals == [(333, signal.SIGKILL)]
    s.observe({"event": "inner_step", "site": "a", "step": 15})
    s.tick(now=1003)
    assert len(env.signals) == 2
    s.tick(now=1031)
    assert len(env.signals) == 3 and not s.pending


def test_freeze_is_undone_after_its_duration(env):
    s = scheduler(env, topo({"kind": "freeze", "target": "site a", "at": "0s", "duration": "5s"}))
    s.tick(now=1000)
    assert env.signals == [(111, signal.SIGSTOP), (222, signal.SIGSTOP)]
    s.tick(now=1004)
    assert len(env.signals) == 2
    s.tick(now=1005.1)
    assert env.signals[2:] == [(111, signal.SIGCONT), (222, signal.SIGCONT)]
    kinds = [e["event"] for e in read_events(env.run_dir / "metrics.jsonl")]
    assert kinds == ["fault_injected", "fault_healed"]


def test_partition_and_degrade_write_the_link_control_file(env):
    s = scheduler(env, topo({"kind": "partition", "target": "link b", "at": "0s", "duration": "1s", "direction": "up"},
                            {"kind": "degrade", "target": "link a", "at": "0s", "duration": "1s", "latency": "200ms"}))
    s.tick(now=1000)
    assert json.loads((env.run_dir / "links" / "b.control.json").read_text()) == {"forward": {"up": False}}
    assert json.loads((env.run_dir / "links" / "a.control.json").read_text()) == \
        {"forward": {"latency_ms": 200.0}, "backward": {"latency_ms": 200.0}}
    s.tick(now=1001.5)
    assert json.loads((env.run_dir / "links" / "b.control.json").read_text()) == {}


def test_disk_full_failpoint_makes_checkpoint_writes_fail_then_heals(env):
    import torch

    from geotrain.storage.checkpoint import write_part

    s = scheduler(env, topo({"kind": "disk_full", "at": "0s", "duration": "1s"}))
    s.tick(now=1000)
    with pytest.raises(OSError, match="No space left"):
        write_part(env.checkpoint_dir, 1, "coordinator", {"m": {"w": torch.zeros(2)}}, {}, "x")
    s.tick(now=1002)
    write_part(env.checkpoint_dir, 1, "coordinator", {"m": {"w": torch.zeros(2)}}, {}, "x")


def test_live_requests_are_validated(env):
    s = scheduler(env, topo())
    faults.request_live_fault(env.run_dir, {"kind": "kill", "target": "worker z/0", "at": "0s"})
    faults.request_live_fault(env.run_dir, {"kind": "kill", "target": "worker a/0", "at": "0s"})
    s.tick(now=1000)
    s.tick(now=1000)
    events = read_events(env.run_dir / "metrics.jsonl")
    assert [e["event"] for e in events] == ["fault_rejected", "fault_injected"]
    assert "no worker 'z/0'" in events[0]["reason"]


def test_every_fault_kind_has_a_failpoint():
    from geotrain.config.topology import FAULT_KINDS

    assert set(faults.REGISTRY) == set(FAULT_KINDS)
