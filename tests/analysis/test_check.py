"""The history checker (geotrain/analysis/check.py): every invariant holds on a good history, is violated
on a history that breaks it, and is unknown where the history carries no evidence."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from geotrain.analysis import check
from geotrain.analysis.check import Verdict, check_history, check_run, format_table, main, verify_manifest
from geotrain.errors import CheckpointCorrupt

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "topologies" / "demo.yaml"
SITES = ("eu-west", "us-east")

# ---- history builders ------------------------------------------------------------------------

_clock = [1000.0]


def ev(kind: str, proc: str = "coordinator", **fields) -> dict:
    _clock[0] += 0.01
    return {"t": _clock[0], "event": kind, "proc": proc, **fields}


def crc(rnd: int) -> int:
    return 1_000_000 + rnd


def commit(rnd: int, version: int | None = None, crc32: int | None = None, sites=SITES, epoch: int | None = None) -> dict:
    fields = {"round": rnd, "version": rnd + 1 if version is None else version, "sites": list(sites),
              "crc32": crc(rnd) if crc32 is None else crc32, "wait_s": 0.01, "apply_s": 0.001}
    if epoch is not None:
        fields["epoch"] = epoch
    return ev("commit", **fields)


def merge(site: str, rnd: int, crc32: int | None = None, version: int | None = None) -> dict:
    return ev("merge", f"{site}/0", site=site, round=rnd, version=rnd + 1 if version is None else version,
              bytes_sent=100, bytes_received=100, seconds=0.1, step=10 * (rnd + 1),
              crc32=crc(rnd) if crc32 is None else crc32)


def coordinator_started(epoch: int = 1, rnd: int | None = None) -> dict:
    fields = {} if rnd is None else {"round": rnd, "resumed": rnd > 0}
    return ev("coordinator_started", address="127.0.0.1:1", pid=1, sites=list(SITES), epoch=epoch, **fields)


def run_started(resume_round: int | None = None) -> dict:
    return ev("run_started", "launcher", run="t", topology_sha256="x", sites=list(SITES), algorithm="diloco",
              resume_round=resume_round)


def site_joined(site: str, rnd: int = 0, start_version: int | None = None) -> dict:
    extra = {} if start_version is None else {"start_version": start_version}
    return ev("site_joined", site=site, workers=2, pid=2, round=rnd, **extra)


def site_ready(site: str, version: int, rnd: int = 0) -> dict:
    return ev("site_ready", f"{site}/0", site=site, version=version, round=rnd)


def eval_(loss: float, step: int) -> dict:
    return ev("eval", "us-east/0", round=step // 10, step=step, loss=loss, seconds=0.1)


def fault(target: str = "eu-west", kind: str = "partition") -> dict:
    return ev("fault_injected", "launcher", fault=kind, target=target, params={}, duration_s=1.0)


def round_events(rnd: int, **commit_kw) -> list[dict]:
    return [commit(rnd, **commit_kw), *(merge(s, rnd) for s in SITES)]


def good_history(rounds: int = 4) -> list[dict]:
    h = [run_started(), coordinator_started(1)]
    for s in SITES:
        h += [site_joined(s), site_ready(s, 0)]
    h.append(eval_(5.0, 0))
    for r in range(rounds):
        h += round_events(r)
        h.append(eval_(3.0 - 0.1 * r, 10 * (r + 1)))
    h.append(ev("run_finished", "launcher", status="completed", reason=None))
    return h


def verdicts(events, **kw) -> dict[str, Verdict]:
    return {v.invariant: v for v in check_history(events, **kw)}


def status(events, invariant: str, **kw) -> str:
    return verdicts(events, **kw)[invariant].status


def insert_before_round(history: list[dict], rnd: int, *events: dict) -> list[dict]:
    """History with events inserted right before the commit of round rnd."""
    i = next(i for i, e in enumerate(history) if e["event"] == "commit" and e["round"] == rnd)
    return history[:i] + list(events) + history[i:]


# ---- shape of the answer -----------------------------------------------------------------------


def test_every_invariant_is_reported_once_in_a_stable_order():
    vs = check_history(good_history())
    assert [v.invariant for v in vs] == list(check.INVARIANTS)
    assert all(v.status in ("held", "violated", "unknown") for v in vs)
    assert all(v.evidence and "\n" not in v.evidence for v in vs)


def test_good_history_violates_nothing():
    vs = verdicts(good_history())
    for name in ("rounds_committed_once_in_order", "version_never_backwards", "sites_agree_after_merge",
                 "no_committed_round_lost", "faults_survived", "no_stale_update_applied"):
        assert vs[name].status == "held", vs[name]
    assert vs["checkpoints_verify"].status == "unknown"  # none given
    assert vs["final_loss_matches_twin"].status == "unknown"  # no twin


def test_empty_history_is_unknown_not_held():
    vs = verdicts([])
    for name in ("rounds_committed_once_in_order", "version_never_backwards", "sites_agree_after_merge",
                 "no_committed_round_lost", "final_loss_matches_twin", "no_stale_update_applied"):
        assert vs[name].status == "unknown", vs[name]


# ---- 1. rounds_committed_once_in_order -------------------------------------------------------


def test_round_committed_twice_is_violated():
    h = good_history(3) + [commit(1, version=9)]
    v = verdicts(h)["rounds_committed_once_in_order"]
    assert v.status == "violated" and "round 1 committed twice" in v.evidence


def test_round_committed_twice_across_coordinator_incarnations_is_violated():
    h = good_history(3) + [coordinator_started(2), commit(2, version=4, epoch=2)]
    assert status(h, "rounds_committed_once_in_order") == "violated"


def test_gap_in_rounds_is_violated():
    h = [e for e in good_history(4) if not (e["event"] == "commit" and e["round"] == 2)]
    v = verdicts(h)["rounds_committed_once_in_order"]
    assert v.status == "violated" and "gap: round 2 never committed" in v.evidence


def test_rounds_must_start_at_zero():
    h = [e for e in good_history(3) if not (e["event"] == "commit" and e["round"] == 0)]
    assert status(h, "rounds_committed_once_in_order") == "violated"


# ---- 2. version_never_backwards ----------------------------------------------------------------


def test_commit_version_going_backwards_is_violated():
    h = good_history(3) + [commit(3, version=2)]
    v = verdicts(h)["version_never_backwards"]
    assert v.status == "violated" and "version 2 after version 3" in v.evidence


def test_commit_version_repeating_is_violated():
    h = good_history(3) + [commit(3, version=3)]
    assert status(h, "version_never_backwards") == "violated"


def test_a_sites_merge_version_going_backwards_is_violated():
    h = good_history(3) + [merge("eu-west", 3, version=1)]
    v = verdicts(h)["version_never_backwards"]
    assert v.status == "violated" and "site eu-west merged version 1" in v.evidence


def test_site_ready_after_rejoin_below_committed_version_is_violated():
    h = good_history(3) + [site_joined("eu-west", 3), site_ready("eu-west", 1, 3)]
    v = verdicts(h)["version_never_backwards"]
    assert v.status == "violated" and "site eu-west ready at version 1" in v.evidence
    assert status(good_history(3) + [site_joined("eu-west", 3), site_ready("eu-west", 3, 3)],
                  "version_never_backwards") == "held"


def test_site_ready_is_judged_from_the_version_at_join_not_a_later_commit():
    # The coordinator committed version 4 between the site's join (at version 3) and its
    # site_ready: starting from 3 is correct, not a counter-example.
    h = good_history(3) + [site_joined("eu-west", 3), commit(3), site_ready("eu-west", 3, 3)]
    assert status(h, "version_never_backwards") == "held"


def test_site_ready_below_the_start_version_it_was_given_is_violated():
    h = good_history(3) + [site_joined("eu-west", 3, start_version=4), commit(3), site_ready("eu-west", 3, 3)]
    assert status(h, "version_never_backwards") == "violated"


# ---- only_committed_versions_served -------------------------------------------------------------


def test_site_holding_a_version_never_committed_is_violated():
    # the coordinator advanced its state but never recorded the commit (seen in a real run whose
    # coordinator failed between advancing and recording): the site runs on weights no commit made
    h = good_history(2) + [site_joined("eu-west", 2), site_ready("eu-west", 3, 3)]
    v = verdicts(h)["only_committed_versions_served"]
    assert v.status == "violated" and "site eu-west ready at version 3" in v.evidence
    assert "newest committed version was 2" in v.evidence
    h = good_history(2) + [merge("us-east", 2)]  # round 2's result, but round 2 was never committed
    assert status(h, "only_committed_versions_served") == "violated"
    saved = lambda v: ev("checkpoint_saved", round=v, path=f"/x/round-{v:06d}/coordinator", seconds=0.1, bytes=10)  # noqa: E731
    assert status(good_history(2) + [saved(2)], "only_committed_versions_served") == "held"
    v = verdicts(good_history(2) + [saved(3)])["only_committed_versions_served"]
    assert v.status == "violated" and "checkpoint saved of version 3" in v.evidence


def test_versions_restored_by_a_coordinator_count_as_committed():
    h = [run_started(resume_round=4), coordinator_started(1, rnd=4), site_joined("eu-west", 4),
         site_ready("eu-west", 4, 4), *round_events(4)]
    v = verdicts(h)["only_committed_versions_served"]
    assert v.status == "held", v
    assert status([commit(0)], "only_committed_versions_served") == "unknown"


# ---- 3. sites_agree_after_merge ----------------------------------------------------------------


def test_sites_disagreeing_after_a_merge_is_violated():
    h = good_history(3)
    i = next(i for i, e in enumerate(h) if e["event"] == "merge" and e["round"] == 1 and e["site"] == "us-east")
    h[i] = {**h[i], "crc32": 42}
    v = verdicts(h)["sites_agree_after_merge"]
    assert v.status == "violated" and "round 1: site us-east holds crc32 42" in v.evidence


def test_sites_agree_counts_rounds_without_evidence():
    h = good_history(3) + [commit(3)] + [merge("eu-west", 7)]  # a commit with no merge; merges with no commit
    v = verdicts(h)["sites_agree_after_merge"]
    assert v.status == "held"
    assert "1 committed rounds without a merge" in v.evidence and "1 rounds with merges but no commit" in v.evidence


def test_sites_agree_is_unknown_without_any_round_of_evidence():
    h = [commit(0), commit(1), merge("eu-west", 5)]
    assert status(h, "sites_agree_after_merge") == "unknown"
    # ddp merges carry no crc32: no evidence either
    ddp = [commit(0), ev("merge", "us-east/0", site="us-east", round=0, step=1, bytes_sent=1, bytes_received=1, seconds=0.1)]
    assert status(ddp, "sites_agree_after_merge") == "unknown"


# ---- 4. checkpoints_verify ---------------------------------------------------------------------


def write_checkpoint(root: Path, rnd: int = 3) -> Path:
    d = root / f"round-{rnd:06d}"
    d.mkdir(parents=True)
    files = {"model.pt": bytes(range(256)) * 8, "optimizer/outer.pt": b"momentum" * 100}
    entries = []
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
        entries.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (d / "manifest.json").write_text(json.dumps({"round": rnd, "topology_sha256": "ab" * 32, "files": entries}))
    return d


@pytest.fixture
def builtin_verifier(monkeypatch):
    """Force the checker's own manifest verification (as if geotrain.storage.checkpoint did not exist)."""
    monkeypatch.setitem(sys.modules, "geotrain.storage.checkpoint", None)  # makes the import raise ImportError


def flip_byte(path: Path, at: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_good_checkpoints_verify(tmp_path, builtin_verifier):
    cps = [write_checkpoint(tmp_path, 1), write_checkpoint(tmp_path, 2)]
    v = verdicts(good_history(), checkpoints=cps)["checkpoints_verify"]
    assert v.status == "held" and "2 checkpoints verified" in v.evidence


def test_no_checkpoints_is_unknown():
    v = verdicts(good_history(), checkpoints=[])["checkpoints_verify"]
    assert v.status == "unknown" and v.evidence == "no checkpoints to verify"


@pytest.mark.parametrize("damage, words", [
    (lambda d: flip_byte(d / "model.pt"), "sha256 mismatch"),
    (lambda d: (d / "model.pt").write_bytes((d / "model.pt").read_bytes()[:-7]), "has 2041 bytes, manifest says 2048"),
    (lambda d: (d / "optimizer" / "outer.pt").unlink(), "optimizer/outer.pt is missing"),
    (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "unreadable"),
])
def test_corrupt_checkpoint_is_violated(tmp_path, builtin_verifier, damage, words):
    good, bad = write_checkpoint(tmp_path, 1), write_checkpoint(tmp_path, 2)
    damage(bad)
    v = verdicts(good_history(), checkpoints=[good, bad])["checkpoints_verify"]
    assert v.status == "violated", v
    assert "1 of 2 checkpoints corrupt" in v.evidence and words in v.evidence and "round-000002" in v.evidence


def write_part(round_dir: Path, part: str, files: dict[str, bytes]) -> Path:
    d = round_dir / part
    d.mkdir(parents=True)
    entries = []
    for rel, data in files.items():
        (d / rel).write_bytes(data)
        entries.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (d / "manifest.json").write_text(json.dumps({"round": 4, "part": part, "topology_sha256": "ab" * 32, "files": entries}))
    return d


def test_round_folder_of_parts_verifies_every_part(tmp_path, builtin_verifier):
    rd = tmp_path / "round-000004"
    write_part(rd, "coordinator", {"model.safetensors": b"m" * 300, "state.json": b"{}"})
    worker = write_part(rd, "us-east.0", {"inner.safetensors": b"i" * 300})
    assert status([], "checkpoints_verify", checkpoints=[rd]) == "held"
    flip_byte(worker / "inner.safetensors")
    v = verdicts([], checkpoints=[rd])["checkpoints_verify"]
    assert v.status == "violated" and "us-east.0" in v.evidence


def test_checkpoints_written_by_geotrain_checkpoint_verify(tmp_path):
    ckpt = pytest.importorskip("geotrain.storage.checkpoint")
    if not hasattr(ckpt, "write_part"):
        pytest.skip("geotrain.storage.checkpoint has no write_part")
    torch = pytest.importorskip("torch")
    part = ckpt.write_part(tmp_path, 4, "coordinator", {"model": {"params": torch.arange(64.0)}}, {"round": 4}, "ab" * 32)
    rd = part.parent
    for verifier in ("theirs", "ours"):
        with pytest.MonkeyPatch.context() as mp:
            if verifier == "ours":
                mp.setitem(sys.modules, "geotrain.storage.checkpoint", None)
            assert status([], "checkpoints_verify", checkpoints=[rd]) == "held", verifier
    flip_byte(part / "model.safetensors", at=-5)
    for verifier in ("theirs", "ours"):
        with pytest.MonkeyPatch.context() as mp:
            if verifier == "ours":
                mp.setitem(sys.modules, "geotrain.storage.checkpoint", None)
            assert status([], "checkpoints_verify", checkpoints=[rd]) == "violated", verifier


def test_manifest_may_not_point_outside_the_checkpoint(tmp_path):
    d = write_checkpoint(tmp_path / "cps", 1)
    (tmp_path / "secret").write_bytes(b"x")
    m = json.loads((d / "manifest.json").read_text())
    m["files"].append({"path": "../../secret", "size": 1, "sha256": hashlib.sha256(b"x").hexdigest()})
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointCorrupt, match="outside the checkpoint"):
        verify_manifest(d)


def test_checkpoint_verification_delegates_to_geotrain_checkpoint(tmp_path, monkeypatch):
    calls = []

    def verify_checkpoint(path):
        calls.append(Path(path))
        if Path(path).name == "bad":
            raise CheckpointCorrupt(f"{path}: tensor 'wte' sha256 mismatch")

    monkeypatch.setitem(sys.modules, "geotrain.storage.checkpoint",
                        types.SimpleNamespace(verify_checkpoint=verify_checkpoint))
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    v = verdicts([], checkpoints=[tmp_path / "good", tmp_path / "bad"])["checkpoints_verify"]
    assert calls == [tmp_path / "good", tmp_path / "bad"]
    assert v.status == "violated" and "tensor 'wte' sha256 mismatch" in v.evidence


# ---- 5. no_committed_round_lost ----------------------------------------------------------------


def test_no_restart_holds_with_a_count():
    v = verdicts(good_history(4))["no_committed_round_lost"]
    assert v.status == "held" and v.evidence == "no coordinator restart; 4 commits"


def test_restart_that_continues_from_the_next_round_holds():
    h = good_history(3) + [coordinator_started(2), *round_events(3, epoch=2), *round_events(4, epoch=2)]
    v = verdicts(h)["no_committed_round_lost"]
    assert v.status == "held" and "1 coordinator restarts" in v.evidence
    assert status(h, "rounds_committed_once_in_order") == "held"


def test_committed_round_lost_across_a_coordinator_restart_is_violated():
    # rounds 0-2 committed; the new coordinator starts over from round 1 (round 2's commit was lost)
    h = good_history(3) + [coordinator_started(2), commit(1, version=2, epoch=2)]
    v = verdicts(h)["no_committed_round_lost"]
    assert v.status == "violated" and "first commit after it is round 1" in v.evidence
    assert "round 2 was committed before; committed round lost" in v.evidence


def test_committed_version_dropping_across_a_restart_is_violated():
    h = good_history(3) + [coordinator_started(2), commit(3, version=2, epoch=2)]
    v = verdicts(h)["no_committed_round_lost"]
    assert v.status == "violated" and "version 2" in v.evidence


def test_restart_with_no_commit_after_it_is_unknown():
    h = good_history(3) + [coordinator_started(2)]
    assert status(h, "no_committed_round_lost") == "unknown"


def test_no_commits_at_all_is_unknown():
    assert status([coordinator_started(1)], "no_committed_round_lost") == "unknown"


def test_restarted_coordinator_starting_behind_the_committed_round_is_violated():
    # even before it commits anything: it declared a round that forgets a committed one
    h = good_history(3) + [coordinator_started(2, rnd=2)]
    v = verdicts(h)["no_committed_round_lost"]
    assert v.status == "violated" and "started at round 2 but round 2 was committed" in v.evidence


def test_round_made_durable_but_not_recorded_before_a_crash_is_not_a_gap():
    # rounds 0-2 recorded; the coordinator made round 3 durable and died before writing its
    # commit; the new incarnation starts at round 4
    h = good_history(3) + [coordinator_started(2, rnd=4), *round_events(4, version=5)]
    v = verdicts(h)["rounds_committed_once_in_order"]
    assert v.status == "held" and "round 3 committed without a commit event" in v.evidence
    assert status(h, "no_committed_round_lost") == "held"
    # but a restart may not skip more than the one round it could have been committing
    h = good_history(3) + [coordinator_started(2, rnd=5), *round_events(5)]
    assert status(h, "rounds_committed_once_in_order") == "violated"


def test_resume_from_a_checkpoint_redoes_rounds_on_purpose():
    # rounds 0-4 committed, the run stopped; `geotrain resume` from checkpoint round 3 redoes 3, 4, 5
    h = good_history(5) + [run_started(resume_round=3), coordinator_started(2, rnd=3)]
    h += [site_joined("eu-west", 3), site_ready("eu-west", 3, 3), site_joined("us-east", 3), site_ready("us-east", 3, 3)]
    for r in (3, 4, 5):
        h += round_events(r, crc32=7_000 + r)
    for e in h[-9:]:
        if e["event"] == "merge":
            e["crc32"] = 7_000 + e["round"]
    vs = verdicts(h)
    for name in ("rounds_committed_once_in_order", "version_never_backwards", "only_committed_versions_served",
                 "sites_agree_after_merge", "no_committed_round_lost", "no_stale_update_applied"):
        assert vs[name].status == "held", vs[name]
    assert "resume from checkpoint round 3" in vs["rounds_committed_once_in_order"].evidence
    # without the resume the same commits are double commits
    plain = [e for e in h if e["event"] not in ("run_started", "coordinator_started")]
    assert status(plain, "rounds_committed_once_in_order") == "violated"


def test_relaunch_from_persisted_state_behind_the_history_is_violated():
    h = good_history(5) + [run_started(), coordinator_started(2, rnd=3), *round_events(3)]
    v = verdicts(h)["no_committed_round_lost"]
    assert v.status == "violated" and "relaunch" in v.evidence and "round 4 was committed" in v.evidence
    h = good_history(5) + [run_started(), coordinator_started(2, rnd=5), *round_events(5)]
    assert status(h, "no_committed_round_lost") == "held"
    assert status(h, "rounds_committed_once_in_order") == "held"


def test_resume_that_starts_from_another_round_than_asked_is_violated():
    h = good_history(5) + [run_started(resume_round=3), coordinator_started(2, rnd=1), *round_events(1)]
    v = verdicts(h)["no_committed_round_lost"]
    assert v.status == "violated" and "resume from checkpoint round 3" in v.evidence


# ---- 6. final_loss_matches_twin ----------------------------------------------------------------


def test_final_loss_within_tolerance_of_the_twin_holds():
    h = good_history(4)  # final eval loss 2.7
    assert status(h, "final_loss_matches_twin", twin_final_loss=2.72) == "held"


def test_final_loss_off_versus_the_twin_is_violated():
    v = verdicts(good_history(4), twin_final_loss=2.5)["final_loss_matches_twin"]
    assert v.status == "violated" and "vs twin 2.5" in v.evidence
    assert status(good_history(4), "final_loss_matches_twin", twin_final_loss=2.5, loss_tolerance=0.1) == "held"


def test_nan_final_loss_is_violated():
    h = good_history(2) + [eval_(float("nan"), 1000)]
    assert status(h, "final_loss_matches_twin", twin_final_loss=2.7) == "violated"


def test_final_loss_without_twin_or_eval_is_unknown():
    assert status(good_history(), "final_loss_matches_twin") == "unknown"
    no_evals = [e for e in good_history() if e["event"] != "eval"]
    v = verdicts(no_evals, twin_final_loss=2.7)["final_loss_matches_twin"]
    assert v.status == "unknown" and "no eval" in v.evidence


# ---- 7. faults_survived ------------------------------------------------------------------------


def test_no_faults_is_vacuously_held():
    v = verdicts(good_history())["faults_survived"]
    assert v.status == "held" and "vacuous" in v.evidence


def test_fault_followed_by_commits_holds():
    h = insert_before_round(good_history(4), 2, fault())
    v = verdicts(h)["faults_survived"]
    assert v.status == "held" and "1 faults injected" in v.evidence
    assert status(h, "faults_survived", min_merges_around_fault=2) == "held"
    assert status(h, "faults_survived", min_merges_around_fault=3) == "unknown"


def test_fault_with_no_merge_after_it_is_unknown_never_held():
    h = good_history(4)
    h.insert(len(h) - 1, fault("coordinator", "kill"))
    v = verdicts(h)["faults_survived"]
    assert v.status == "unknown" and "kill on coordinator" in v.evidence


# ---- 8. no_stale_update_applied ----------------------------------------------------------------


def test_refused_stale_update_is_fine():
    h = good_history(3) + [ev("merge_refused", site="eu-west", round=1, action="stale", reason="round 1 committed")]
    v = verdicts(h)["no_stale_update_applied"]
    assert v.status == "held" and "1 stale" in v.evidence


def test_commit_listing_a_site_twice_is_violated():
    h = good_history(2) + [commit(2, sites=["eu-west", "us-east", "eu-west"])]
    v = verdicts(h)["no_stale_update_applied"]
    assert v.status == "violated" and "applied eu-west twice" in v.evidence


def test_commit_for_an_older_round_is_violated():
    h = good_history(3) + [commit(0, version=4)]
    v = verdicts(h)["no_stale_update_applied"]
    assert v.status == "violated" and "commit of round 0" in v.evidence and "after round 2" in v.evidence


def test_commit_applying_an_update_from_a_site_never_in_the_run_is_violated():
    h = good_history(2) + [commit(2, sites=["eu-west", "mallory"])]
    v = verdicts(h)["no_stale_update_applied"]
    assert v.status == "violated" and "mallory" in v.evidence


# ---- the table and the command ----------------------------------------------------------------


def test_format_table_is_aligned():
    table = format_table(check_history(good_history()))
    lines = table.splitlines()
    assert lines[0].split() == ["invariant", "status", "evidence"]
    assert len(lines) == 2 + len(check.INVARIANTS)
    col = lines[0].index("status")
    assert all(line[col - 2:col] == "  " for line in lines)  # every row's status starts in one column
    assert all(line[col:].split()[0] in ("status", "held", "violated", "unknown") for line in lines[2:] + lines[:1])


def write_run(root: Path, events: list[dict]) -> Path:
    root.mkdir(parents=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return root


def test_main_exit_codes(tmp_path, capsys):
    good = write_run(tmp_path / "good", good_history())
    assert main([str(good)]) == 0
    out = capsys.readouterr().out
    # 3 unknown: no checkpoints, no twin, and these commits carry no `finite` digest (global_model_finite)
    assert "rounds_committed_once_in_order" in out and out.strip().endswith("8 held, 0 violated, 3 unknown")

    bad = write_run(tmp_path / "bad", good_history(3) + [commit(1, version=9)])
    assert main([str(bad)]) == 1
    assert "violated" in capsys.readouterr().out

    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"geotrain check: no run directory at {tmp_path / 'missing'}"]

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_main_json_and_twin(tmp_path, capsys):
    run = write_run(tmp_path / "run", good_history(4))  # final loss 2.7
    twin = write_run(tmp_path / "twin", [])
    (twin / "summary.json").write_text(json.dumps({"final_eval_loss": 2.0}))
    assert main([str(run), "--twin", str(twin), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    by = {v["invariant"]: v for v in doc["verdicts"]}
    assert doc["ok"] is False and by["final_loss_matches_twin"]["status"] == "violated"
    assert main([str(run), "--twin", str(twin), "--tolerance", "0.5"]) == 0
    capsys.readouterr()
    assert main([str(run), "--twin", str(tmp_path / "nowhere")]) == 2
    assert "twin run directory" in capsys.readouterr().err


def test_check_run_finds_checkpoints(tmp_path, builtin_verifier):
    run = write_run(tmp_path / "run", good_history())
    write_checkpoint(run / "checkpoints", 1)
    bad = write_checkpoint(run / "checkpoints", 2)
    (run / "checkpoints" / "round-000003.tmp").mkdir()  # a save in progress: not a checkpoint
    vs = {v.invariant: v for v in check_run(run)}
    assert vs["checkpoints_verify"].status == "held" and "2 checkpoints" in vs["checkpoints_verify"].evidence
    flip_byte(bad / "optimizer" / "outer.pt")
    vs = {v.invariant: v for v in check_run(run)}
    assert vs["checkpoints_verify"].status == "violated"


def split_by_host(tmp_path, history: list[dict]) -> list[Path]:
    """``history`` as separate hosts write it (geotrain coordinator/site --run-dir): the coordinator's events in
    one directory, each site's workers' in its own; no launcher."""
    parts: dict[str, list[dict]] = {}
    for e in history:
        if e["proc"] != "launcher":
            parts.setdefault("coordinator" if e["proc"] == "coordinator" else e["proc"].split("/")[0], []).append(e)
    return [write_run(tmp_path / name, evs) for name, evs in sorted(parts.items())]


def test_the_directories_of_separate_hosts_are_checked_as_one_history(tmp_path, capsys):
    """Alone, the coordinator's directory cannot show that the sites hold its weights (their merges are elsewhere);
    with the sites' directories the check sees them, and a site holding other weights is a violation."""
    good = split_by_host(tmp_path / "good", [e for e in good_history() if e["proc"] != "launcher"])
    vs = {v.invariant: v for v in check_run(good[0])}
    assert vs["sites_agree_after_merge"].status == "unknown"
    vs = {v.invariant: v for v in check_run(good)}
    assert vs["sites_agree_after_merge"].status == "held" and vs["rounds_committed_once_in_order"].status == "held"
    assert main([str(d) for d in good]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{', '.join(map(str, good))}: 8 held, 0 violated, 3 unknown")

    history = [e for e in good_history() if e["proc"] != "launcher"]
    i = next(i for i, e in enumerate(history) if e["event"] == "merge" and e["site"] == "us-east" and e["round"] == 2)
    history[i] = {**history[i], "crc32": 7}
    bad = split_by_host(tmp_path / "bad", history)
    assert main([str(bad[0])]) == 0  # the coordinator's part alone shows nothing wrong
    assert main([str(d) for d in bad]) == 1
    vs = {v.invariant: v for v in check_run(bad)}
    assert vs["sites_agree_after_merge"].status == "violated" and "us-east" in vs["sites_agree_after_merge"].evidence


def test_directories_that_are_not_one_run_are_refused_with_the_reason(tmp_path, capsys):
    a = split_by_host(tmp_path / "a", [e for e in good_history() if e["proc"] != "launcher"])
    launched = write_run(tmp_path / "launched", good_history())
    assert main([str(a[0]), str(launched)]) == 2
    err = capsys.readouterr().err
    assert "are not the parts of one run" in err and "written by `geotrain launch`" in err
    assert main([str(a[0]), str(a[0])]) == 2  # the same part twice
    assert "both" in capsys.readouterr().err


def test_several_launched_runs_are_checked_one_by_one(tmp_path, capsys):
    """`geotrain check runs/demo-faults-*` (the README's): every run its own table; exit 1 if any is violated."""
    good = write_run(tmp_path / "r1", good_history())
    bad = write_run(tmp_path / "r2", good_history(3) + [commit(1, version=9)])
    assert main([str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{good}: 8 held, 0 violated" in out and f"{bad}: 6 held, 2 violated" in out and out.count("invariant  ") == 2
    assert out.count("rounds_committed_once_in_order") == 2
    assert main([str(good), str(good), "--json"]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert [d["run_dir"] for d in docs] == [str(good), str(good)] and all(d["ok"] for d in docs)


def test_a_slurm_run_directory_is_checked_with_its_parts(tmp_path):
    """--backend slurm: RUN/metrics.jsonl is the launcher's; the coordinator's history is RUN/control/, each
    site's RUN/site-NAME/ (geotrain.run.slurm_launch). A check of RUN sees them all."""
    history = good_history()
    i = next(i for i, e in enumerate(history) if e["event"] == "merge" and e["site"] == "eu-west" and e["round"] == 1)
    history[i] = {**history[i], "crc32": 7}
    run = write_run(tmp_path / "run", [e for e in history if e["proc"] == "launcher"])
    write_run(run / "control", [e for e in history if e["proc"] == "coordinator"])
    for site in SITES:
        write_run(run / f"site-{site}", [e for e in history if e["proc"].startswith(site + "/")])
    vs = {v.invariant: v for v in check_run(run)}
    assert vs["rounds_committed_once_in_order"].status == "unknown"  # no slurm/jobs.json: not that layout
    (run / "slurm").mkdir()
    (run / "slurm" / "jobs.json").write_text("[]")
    vs = {v.invariant: v for v in check_run(run)}
    assert vs["rounds_committed_once_in_order"].status == "held"
    assert vs["sites_agree_after_merge"].status == "violated" and "eu-west" in vs["sites_agree_after_merge"].evidence


# ---- a real run ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("check") / "run"
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "launch", str(DEMO), "--set", "training.rounds=3",
                        "--run-dir", str(run_dir), "--quiet"], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return run_dir


def run_check_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geotrain.cli", "check", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


@pytest.mark.slow
def test_real_run_violates_nothing(real_run):
    vs = {v.invariant: v for v in check_run(real_run)}
    assert not [v for v in vs.values() if v.status == "violated"], format_table(vs.values())
    for name in ("rounds_committed_once_in_order", "version_never_backwards", "sites_agree_after_merge",
                 "no_committed_round_lost", "no_stale_update_applied"):
        assert vs[name].status == "held", vs[name]
    assert "3 commits" in vs["rounds_committed_once_in_order"].evidence
    # a run is its own perfect twin
    assert {v.invariant: v for v in check_run(real_run, twin=real_run)}["final_loss_matches_twin"].status == "held"


@pytest.mark.slow
def test_cli_exit_codes_on_a_real_run(real_run, tmp_path):
    r = run_check_cli(str(real_run))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rounds_committed_once_in_order" in r.stdout

    # a tampered copy: round 1 committed a second time, and one site's weights differ after a merge
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    lines = (real_run / "metrics.jsonl").read_text().splitlines(keepends=True)
    commit_1 = next(line for line in lines if json.loads(line)["event"] == "commit" and json.loads(line)["round"] == 1)
    out = []
    for line in lines:
        e = json.loads(line)
        if e["event"] == "merge" and e["round"] == 2 and e["site"] == "eu-west":
            line = json.dumps({**e, "crc32": (e["crc32"] + 1) % 2**32}) + "\n"
        out.append(line)
    (tampered / "metrics.jsonl").write_text("".join(out) + commit_1)
    r = run_check_cli(str(tampered))
    assert r.returncode == 1, r.stdout + r.stderr
    statuses = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[2:] if line.strip() and "  " in line}
    assert statuses["rounds_committed_once_in_order"] == "violated"
    assert statuses["sites_agree_after_merge"] == "violated"

    r = run_check_cli(str(tmp_path / "no-such-run"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"geotrain check: no run directory at {tmp_path / 'no-such-run'}"
    assert "Traceback" not in r.stderr


# ---- streaming-diloco: every fragment has rounds of its own ------------------------------------

def stream_history(fragments: int = 2, rounds: int = 2) -> list[dict]:
    """Commits carry the run's version (all fragments' commits so far); merges the fragment's round + 1."""
    h = [run_started(), coordinator_started(1)]
    for s in SITES:
        h += [site_joined(s), site_ready(s, 0)]
    version = 0
    for r in range(rounds):
        for f in range(fragments):
            version += 1
            c = commit(r, version=version, crc32=crc(10 * r + f))
            c["fragment"] = f
            h.append(c)
            for s in SITES:
                m = merge(s, r, crc32=crc(10 * r + f))
                m["fragment"] = f
                h.append(m)
    h.append(ev("run_finished", "launcher", status="completed", reason=None))
    return h


def test_streaming_history_violates_nothing():
    v = verdicts(stream_history())
    assert not [x for x in v.values() if x.status == "violated"], v
    assert v["only_committed_versions_served"].status == "held"


def test_streaming_site_rejoining_at_the_runs_version_holds():
    """A site restarted after 3 fragment commits is ready at version 3, above any one fragment's count."""
    h = stream_history(fragments=4, rounds=2)
    i = [k for k, e in enumerate(h) if e["event"] == "commit"][3]  # before the 4th commit
    h = h[:i] + [site_joined("eu-west", start_version=3), site_ready("eu-west", 3, rnd=0)] + h[i:]
    assert status(h, "only_committed_versions_served") == "held"


def test_streaming_site_ready_above_the_runs_commits_is_violated():
    h = stream_history(fragments=4, rounds=2)
    i = [k for k, e in enumerate(h) if e["event"] == "commit"][3]
    h = h[:i] + [site_ready("eu-west", 4, rnd=0)] + h[i:]  # only 3 commits so far
    assert status(h, "only_committed_versions_served") == "violated"


def restart_mid_round(h: list[dict], lane_rounds: list[int] | None) -> list[dict]:
    """A coordinator restart after fragments 0-2 of round 0 committed, before fragment 3 did."""
    i = [k for k, e in enumerate(h) if e["event"] == "commit"][3]
    restarted = coordinator_started(2, rnd=1)
    if lane_rounds is not None:
        restarted["lane_rounds"] = lane_rounds
    return h[:i] + [restarted] + h[i:]


def test_streaming_coordinator_restart_goes_on_per_fragment():
    h = restart_mid_round(stream_history(fragments=4, rounds=2), lane_rounds=[1, 1, 1, 0])
    assert status(h, "rounds_committed_once_in_order") == "held"
    assert status(h, "no_committed_round_lost") == "held"


def test_streaming_coordinator_restart_that_skips_a_fragments_round_is_violated():
    # it says fragment 3 goes on at round 1, yet round 0 of fragment 3 was never committed
    h = restart_mid_round(stream_history(fragments=4, rounds=2), lane_rounds=[1, 1, 1, 1])
    assert status(h, "rounds_committed_once_in_order") == "violated"


def test_streaming_coordinator_restart_behind_a_fragments_commit_is_violated():
    # fragment 0's round 0 was committed, yet the restarted coordinator says it collects round 0 again
    h = restart_mid_round(stream_history(fragments=4, rounds=2), lane_rounds=[0, 1, 1, 0])
    assert status(h, "no_committed_round_lost") == "violated"
