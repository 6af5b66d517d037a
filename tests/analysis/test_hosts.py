"""geotrain.analysis.hosts: the run dirs of separate hosts (geotrain coordinator/site --run-dir) merged
into one run, and the dirs that must not be merged, each with its reason. Hand-written dirs, no processes."""

from __future__ import annotations

import json
from pathlib import Path

from geotrain.analysis.hosts import (combine, group_runs, host_record, judge, merge_runs, same_run,
                                     topology_digest)
from geotrain.analysis.report import write_report
from geotrain.analysis.rundir import load_run

T0 = 1_700_000_000.0
SITES = ("us-east", "eu-west")
ROUNDS, H = 3, 2
MERGE_BYTES = 1000  # bytes_sent == bytes_received per merge


def topology(name: str = "three-hosts", sites=SITES, rounds: int = ROUNDS, algorithm: str = "diloco") -> dict:
    return {"name": name, "sites": [{"name": s, "workers": 1} for s in sites], "coordinator": {"at": "hub"},
            "training": {"algorithm": algorithm, "inner_steps": H, "rounds": rounds}}


def write(d: Path, events: list[dict], files: dict[str, dict] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in sorted(events, key=lambda e: e["t"])))
    for rel, doc in (files or {}).items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(json.dumps(doc))
    return d


def coordinator_dir(d: Path, *, sites=SITES, commits: int = ROUNDS, t0: float = T0, links: bool = True,
                    extra: tuple[dict, ...] = ()) -> Path:
    """What `geotrain coordinator --run-dir d` leaves, plus a link's counters (`geotrain link --stats-file
    d/links/NAME.json`): coordinator_started, a commit per round, coordinator_stopped."""
    ev = [{"t": t0, "event": "coordinator_started", "proc": "coordinator", "address": "127.0.0.1:5000",
           "sites": list(sites), "epoch": 1, "round": 0, "resumed": False}]
    for r in range(commits):
        ev.append({"t": t0 + 3 + 2.5 * r, "event": "commit", "proc": "coordinator", "round": r, "version": r + 1,
                   "sites": list(sites)})
    ev.append({"t": t0 + 4 + 2.5 * ROUNDS, "event": "coordinator_stopped", "proc": "coordinator", "round": commits,
               "reason": "done"})
    ev += list(extra)
    files = {}
    if links:
        files = {f"links/{s}--hub.json": {"name": f"{s}<->hub", "bytes_forward": 4000 + i, "bytes_backward": 3000 + i}
                 for i, s in enumerate(sites)}
    return write(d, ev, files)


def site_dir(d: Path, site: str, *, topo: dict | None = None, t0: float = T0, rounds: int = ROUNDS) -> Path:
    """What `geotrain site SITE TOPOLOGY --run-dir d` leaves: the site's own events (proc `site SITE`),
    its worker's, and topology.SITE.json."""
    topo = topo if topo is not None else topology()
    ev = [{"t": t0 + 0.5, "event": "process_started", "proc": f"site {site}", "name": f"worker {site}/0",
           "role": "worker", "pid": 123},
          {"t": t0 + 1.0, "event": "site_ready", "proc": f"{site}/0", "site": site, "version": 0, "round": 0}]
    step = 0
    for r in range(rounds):
        t = t0 + 1 + 2.5 * r
        for _ in range(H):
            step += 1
            t += 0.8
            ev.append({"t": t, "event": "inner_step", "proc": f"{site}/0", "site": site, "round": r, "step": step,
                       "loss": 4.0, "compute_s": 0.7, "wan_s": 0.0})
        ev.append({"t": t0 + 3.1 + 2.5 * r, "event": "merge", "proc": f"{site}/0", "site": site, "round": r,
                   "version": r + 1, "bytes_sent": MERGE_BYTES, "bytes_received": MERGE_BYTES, "seconds": 0.4,
                   "step": step})
        ev.append({"t": t0 + 3.2 + 2.5 * r, "event": "eval", "proc": f"{site}/0", "site": site, "round": r + 1,
                   "step": step, "loss": 0.5 / (r + 1), "metric": "mse"})
    return write(d, ev, {f"topology.{site}.json": topo})


def three_hosts(tmp_path: Path) -> list[Path]:
    return [coordinator_dir(tmp_path / "A"), site_dir(tmp_path / "B", "us-east"), site_dir(tmp_path / "C", "eu-west")]


def records(paths):
    return [host_record(load_run(p)) for p in paths]


# ------------------------------------------------------------------------------------------ host_record

def test_host_record_names_who_wrote_a_dir_and_its_run(tmp_path):
    a, b, _ = three_hosts(tmp_path)
    coord, site = records([a, b])
    assert coord.parts == ("coordinator",)
    assert coord.run is None and coord.digest is None  # the coordinator writes neither
    assert coord.sites == SITES  # from coordinator_started
    assert site.parts == ("site us-east",)  # the site's own events and its worker's (us-east/0)
    assert site.run == "three-hosts"
    assert site.digest == topology_digest(topology())
    assert site.sites == SITES
    assert site.span == (T0 + 0.5, T0 + 3.2 + 2.5 * (ROUNDS - 1))


def test_topology_digest_is_the_topologys_own(tmp_path):
    """sha256 of the canonical JSON, as Topology.digest() computes it for the same topology."""
    from geotrain.config.topology import parse_topology

    topo = parse_topology(topology())
    assert topology_digest(topo.model_dump(mode="json")) == topo.digest()


# ------------------------------------------------------------------------------------------ one run

def test_the_parts_of_one_run_are_merged(tmp_path):
    paths = three_hosts(tmp_path)
    runs = combine([load_run(p) for p in paths])
    assert len(runs) == 1
    run = runs[0]
    assert run.parts == [paths[0], paths[1], paths[2]]
    assert run.sites == list(SITES)
    assert run.rounds_planned == ROUNDS
    assert run.rounds_completed == ROUNDS  # from the coordinator's commits
    assert run.status == "completed" and run.reason is None
    # WAN bytes from the link counters found in the coordinator's dir
    assert run.wan_bytes == (4000 + 3000) + (4001 + 3001)
    assert run.link_bytes() == {"us-east<->hub": (4000, 3000), "eu-west<->hub": (4001, 3001)}
    assert run.merge_wan_bytes() == 2 * len(SITES) * ROUNDS * MERGE_BYTES
    stats = run.site_stats()
    assert stats["us-east"]["inner_steps"] == ROUNDS * H and stats["eu-west"]["merges"] == ROUNDS
    assert [e["t"] for e in run.events] == sorted(e["t"] for e in run.events)
    assert run.label == "three-hosts (diloco, 3 hosts)"
    assert "merged from the run directories of 3 separate hosts" in run.notes[0]
    assert ("(same run: the same topology (sha256 " + topology_digest(topology())[:12] + ", run three-hosts); each "
            "holds other parts (coordinator; site us-east; site eu-west); their histories overlap in time)") in run.notes[0]


def test_the_order_the_dirs_are_given_in_does_not_matter(tmp_path):
    a, b, c = three_hosts(tmp_path)
    run = combine([load_run(p) for p in (c, a, b)])[0]
    assert run.parts[0] == a  # the coordinator's first
    assert run.rounds_completed == ROUNDS and run.status == "completed"


def test_without_link_counters_the_wan_bytes_are_the_merges(tmp_path):
    paths = [coordinator_dir(tmp_path / "A", links=False), site_dir(tmp_path / "B", "us-east"),
             site_dir(tmp_path / "C", "eu-west")]
    run = combine([load_run(p) for p in paths])[0]
    assert run.wan_bytes is None and run.link_bytes() == {}
    assert run.merge_wan_bytes() == 2 * len(SITES) * ROUNDS * MERGE_BYTES
    assert any("no link counters" in n for n in run.notes)


def test_fewer_commits_than_planned_is_incomplete_with_the_count(tmp_path):
    paths = [coordinator_dir(tmp_path / "A", commits=1), site_dir(tmp_path / "B", "us-east"),
             site_dir(tmp_path / "C", "eu-west")]
    run = combine([load_run(p) for p in paths])[0]
    assert run.rounds_completed == 1
    assert run.status == "incomplete"
    assert run.reason == f"the coordinator's history completes 1 of {ROUNDS} rounds"


def test_sites_without_their_coordinator_are_one_run_with_rounds_unknown(tmp_path):
    _, b, c = three_hosts(tmp_path)
    run = combine([load_run(b), load_run(c)])[0]
    assert run.parts == [b, c]
    assert run.status == "incomplete"
    assert "no coordinator's run directory" in run.reason


def test_a_failed_round_without_a_later_commit_fails_the_run(tmp_path):
    bad = ({"t": T0 + 20, "event": "round_failed", "proc": "coordinator", "round": 3, "reason": "quorum lost"},)
    paths = [coordinator_dir(tmp_path / "A", commits=2, extra=bad), site_dir(tmp_path / "B", "us-east"),
             site_dir(tmp_path / "C", "eu-west")]
    run = combine([load_run(p) for p in paths])[0]
    assert (run.status, run.reason) == ("failed", "round 3 failed: quorum lost")


def test_judge():
    commit = {"t": 2.0, "event": "commit", "round": 0}
    assert judge([commit], 1, 1, True) == ("completed", None)
    assert judge([commit], 1, 2, True) == ("incomplete", "the coordinator's history completes 1 of 2 rounds")
    assert judge([commit], 1, None, True)[1] == "the coordinator's history completes 1 of ? rounds"
    assert judge([{**commit, "finite": False}], 1, 1, True)[0] == "failed"
    assert judge([{"t": 1.0, "event": "model_nonfinite", "round": 0}], 0, 1, True)[0] == "failed"
    late_failure = [commit, {"t": 3.0, "event": "round_failed", "round": 1, "reason": "x"}]
    assert judge(late_failure, 1, 2, True) == ("failed", "round 1 failed: x")
    assert judge(late_failure[::-1] + [{**commit, "t": 4.0}], 1, 2, True)[0] == "incomplete"
    assert judge([{"event": "round_failed", "round": 1}, commit], 1, 1, True) == ("completed", None)  # no `t`: ignored
    assert judge([commit], 1, 1, False)[0] == "incomplete"


def test_rounds_are_counted_the_way_the_algorithm_merges(tmp_path):
    """ddp commits once per inner step: 3 rounds of H=2 are 6 commits."""
    topo = topology(algorithm="ddp")
    coord = [{"t": T0, "event": "coordinator_started", "proc": "coordinator", "sites": list(SITES)}]
    coord += [{"t": T0 + 1 + k, "event": "commit", "proc": "coordinator", "round": k, "version": k + 1}
              for k in range(ROUNDS * H - 1)]
    paths = [write(tmp_path / "A", coord), site_dir(tmp_path / "B", "us-east", topo=topo),
             site_dir(tmp_path / "C", "eu-west", topo=topo)]
    run = combine([load_run(p) for p in paths])[0]
    assert run.rounds_completed == ROUNDS - 1  # 5 commits: 2 whole rounds, not 5
    assert run.status == "incomplete"


# ------------------------------------------------------------------------------------------ not one run

def test_two_different_runs_are_not_merged_and_say_why(tmp_path):
    """A site of another topology (another digest), at the same time: not one run."""
    a, b, _ = three_hosts(tmp_path)
    other = site_dir(tmp_path / "C", "eu-west", topo=topology(rounds=ROUNDS + 5))
    decision = same_run(records([a, b, other]))
    assert not decision.same
    assert decision.reason.startswith("their topologies differ (sha256 ")
    assert str(b) in decision.reason and str(other) in decision.reason
    runs = combine([load_run(p) for p in (a, b, other)])
    assert len(runs) == 2
    merged, alone = runs
    assert merged.parts == [a, b]
    assert alone.path == other and not alone.parts
    assert any(n.startswith(f"not merged with `{a}`, `{b}`: their topologies differ") for n in alone.notes)


def test_another_run_name_is_another_run(tmp_path):
    """The same topology but for its name: the digests differ too, and the names are said."""
    b = site_dir(tmp_path / "B", "us-east")
    c = site_dir(tmp_path / "C", "eu-west", topo=topology(name="other-run"))
    recs = records([b, c])
    assert not same_run(recs).same
    # the name is the reason where no digest is known (a record from a run_started-less dir)
    no_digest = [r.__class__(**{**r.__dict__, "digest": None}) for r in recs]
    assert same_run(no_digest).reason == "their run names differ (other-run, three-hosts)"


def test_a_site_the_coordinator_does_not_name_is_not_its_run(tmp_path):
    """The coordinator (no name, no digest) of sites a, b and a site c whose topology names c, d: the
    union of the names covers every part, yet they are not one run."""
    a = coordinator_dir(tmp_path / "A", sites=("a", "b"))
    c = site_dir(tmp_path / "C", "c", topo=topology(sites=("c", "d")))
    decision = same_run(records([a, c]))
    assert not decision.same
    assert decision.reason == f"{c} holds site c, which {a} does not name (it names a, b)"


def test_histories_that_do_not_overlap_in_time_are_two_runs(tmp_path):
    """The same topology run twice, an hour apart."""
    a = coordinator_dir(tmp_path / "A")
    b = site_dir(tmp_path / "B", "us-east", t0=T0 + 3600)
    decision = same_run(records([a, b]))
    assert (decision.same, decision.reason) == (False, "their histories do not overlap in time")


def test_a_dir_with_no_identifying_events_is_not_merged(tmp_path):
    a, b, _ = three_hosts(tmp_path)
    anon = write(tmp_path / "X", [{"t": T0 + 2, "event": "inner_step", "step": 1, "loss": 1.0}])
    assert host_record(load_run(anon)).parts == ()
    decision = same_run(records([a, anon]))
    assert decision == decision.__class__(False, f"{anon} holds no events of a coordinator or a site")
    runs = combine([load_run(p) for p in (a, b, anon)])
    assert [r.parts for r in runs] == [[a, b], []]
    assert any("holds no events of a coordinator or a site" in n for n in runs[1].notes)
    assert runs[1].judged is None  # nobody's part: not judged as one


def test_the_same_part_twice_is_not_merged(tmp_path):
    """Two dirs that both hold the coordinator (or the same site), e.g. one dir given twice."""
    a, b, _ = three_hosts(tmp_path)
    a2 = coordinator_dir(tmp_path / "A2")
    assert same_run(records([a, a2])).reason == f"both {a} and {a2} hold the history of the coordinator"
    assert same_run(records([b, b])).reason == f"both {b} and {b} hold the history of the site us-east"
    runs = combine([load_run(p) for p in (a, b, a2)])
    assert [len(r.parts) for r in runs] == [2, 0]
    assert any(f"both {a} and {a2} hold the history of the coordinator" in n for n in runs[1].notes)


def test_a_launched_run_is_never_merged(tmp_path):
    launched = write(tmp_path / "L", [{"t": T0, "event": "run_started", "proc": "launcher", "run": "three-hosts"},
                                      {"t": T0 + 1, "event": "commit", "proc": "coordinator", "round": 0}])
    b = site_dir(tmp_path / "B", "us-east")
    decision = same_run(records([launched, b]))
    assert not decision.same and "written by `geotrain launch`" in decision.reason
    runs = combine([load_run(launched), load_run(b)])
    assert len(runs) == 2
    assert not any("not merged" in n for n in runs[0].notes)  # a whole run: nothing to explain
    assert any("not merged" in n for n in runs[1].notes)


def test_one_dir_alone_is_not_a_merge(tmp_path):
    a = coordinator_dir(tmp_path / "A")
    assert same_run(records([a])) == same_run.__globals__["Decision"](False, "one run directory")
    assert group_runs(records([a])) == [([0], None)]


def test_a_lone_host_dir_is_judged_from_its_history(tmp_path):
    """One dir that holds the coordinator and both sites (separate-host commands sharing a run dir):
    no launcher wrote a summary, so its status comes from the coordinator's commits."""
    d = tmp_path / "shared"
    coordinator_dir(d)
    for s in SITES:  # append each site's events and topology into the same dir
        part = site_dir(tmp_path / f"part-{s}", s)
        with open(d / "metrics.jsonl", "a") as f:
            f.write((part / "metrics.jsonl").read_text())
        (d / f"topology.{s}.json").write_text((part / f"topology.{s}.json").read_text())
    run = combine([load_run(d)])[0]
    assert not run.parts
    assert run.rounds_completed == ROUNDS
    assert (run.status, run.reason) == ("completed", None)


def test_merge_runs_keeps_each_parts_notes_and_every_link(tmp_path):
    a, b, c = three_hosts(tmp_path)
    (c / "links").mkdir()
    (c / "links" / "extra.json").write_text(json.dumps({"name": "ring a->b", "bytes_forward": 7, "bytes_backward": 0}))
    (c / "summary.json").write_text("{not json")
    runs = [load_run(p) for p in (a, b, c)]
    merged = merge_runs(runs, same_run([host_record(r) for r in runs]))
    assert set(merged.link_bytes()) == {"us-east<->hub", "eu-west<->hub", "ring a->b"}
    assert any(n.startswith("`C`: `summary.json` could not be read") for n in merged.notes)


# ------------------------------------------------------------------------------------------ the report

def test_report_of_three_host_dirs_is_one_run(tmp_path):
    paths = three_hosts(tmp_path)
    report = write_report(paths, tmp_path / "out").read_text()
    assert "Runs: " + " + ".join(f"`{p}`" for p in paths) + "\n" in report
    assert report.count("\n## 1. ") == 1 and "\n## 2. " not in report
    assert "Run directories (one run, from separate hosts): " + ", ".join(f"`{p}`" for p in paths) in report
    assert f"| rounds completed / planned | {ROUNDS} / {ROUNDS} |" in report
    assert "| WAN bytes (link counters, both directions) | 14 kB (14,002 B) |" in report
    for s in SITES:
        assert f"| {s} | 1 | {ROUNDS * H} | {ROUNDS} |" in report
    assert "| status | completed |" in report
    assert (tmp_path / "out" / "report-link-bytes.png").is_file()
    assert (tmp_path / "out" / "report-eval-mse-vs-steps.png").is_file()


def test_report_of_two_runs_says_why_they_were_not_merged(tmp_path):
    a, b, _ = three_hosts(tmp_path)
    other = site_dir(tmp_path / "C", "eu-west", topo=topology(rounds=ROUNDS + 5))
    report = write_report([a, b, other], tmp_path / "out").read_text()
    assert "\n## 2. " in report
    assert f"> Note: not merged with `{a}`, `{b}`: their topologies differ (sha256 " in report
