"""summary.json: the numbers of a run, computed from its metrics.jsonl and link counters.

Fields (stable): ``status`` (completed | failed), ``reason``, ``rounds_completed``,
``initial_eval_loss``, ``final_eval_loss``, ``eval_losses`` ([round, inner step, loss] per eval),
``wan_bytes`` (every byte that crossed an emulated link, both directions), ``links`` (bytes per
link and direction), ``wall_seconds``, ``inner_steps`` (per site), ``tokens_per_second`` and
``sites`` with, per site, ``compute_seconds``, ``wan_wait_seconds``, ``merges`` and ``bytes_sent``;
``failures``, ``recoveries``, ``rounds_lost`` (rounds a recovering part missed), ``recovery_seconds``
(one per recovery, failure to recovered), ``goodput`` (compute whose work reached the global
model over sites x wall time; synchronous DiLoCo), ``utilisation`` (all compute over sites x wall time),
``faults_drawn`` (fault_rate's random faults fired) and ``checkpoint_stall_seconds`` (training time spent
snapshotting state for background checkpoint writes, summed over site leaders).

A run whose global model went non-finite failed, whatever its processes' exit codes:
:func:`nonfinite_model` says from one event whether it shows that (``model_nonfinite``, a ``commit``
with ``finite: false``, an ``eval`` whose loss is NaN or infinite), :func:`model_failure` from a
history; the launcher asks both (live, and once more when the run ends).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from geotrain.events import number, read_events
from geotrain.config.topology import Topology


def nonfinite_model(event: dict) -> str | None:
    """Why this event shows that the run's global model went non-finite, or None."""
    kind = event.get("event")
    where = f"round {event['round']}" if event.get("round") is not None else "a round"
    if kind == "model_nonfinite":
        return f"the coordinator holds a non-finite global model ({where})" + (
            f": {str(event['reason'])[:200]}" if event.get("reason") else "")
    if kind == "commit" and event.get("finite") is False:
        return f"the commit of {where} left the global model non-finite"
    loss = number(event.get("loss")) if kind == "eval" else None
    if loss is not None and not math.isfinite(loss):
        return f"the eval loss at {where} is {loss}"
    return None


def model_failure(events: list[dict]) -> str | None:
    """The first sign in a history that the global model went non-finite, or None."""
    return next((r for r in map(nonfinite_model, events) if r is not None), None)


def rounds_completed(events: list[dict], topo: Topology) -> int:
    """The rounds a history completed, counted the way its algorithm merges."""
    tr = topo.training
    # distinct commits: a resumed run redoes the rounds after its checkpoint
    committed = len({(c.get("fragment", 0), c["round"]) for c in events if c["event"] == "commit"})
    if tr.algorithm == "ddp":
        return committed // tr.inner_steps
    if tr.algorithm == "streaming-diloco":
        return committed // tr.streaming.fragments
    if tr.algorithm == "async-diloco":
        # every site had this many updates committed at least; counted from the coordinator's commits, not
        # the sites' merge events: a site killed between the commit and its merge event still merged
        per_site = {s.name: set() for s in topo.sites}
        for c in events:
            if c["event"] == "commit":
                for site in c.get("sites") or ():
                    per_site.setdefault(site, set()).add(c["round"])
        return min((len(per_site[s.name]) for s in topo.sites), default=0)
    return committed


def shortfall(events: list[dict], topo: Topology, script: bool = False) -> str | None:
    """Why a run whose processes all exited 0 did not do what it was asked, or None: a run that completes
    fewer rounds than planned has not completed (a script that never calls diloco.step(), or stops early)."""
    planned = topo.training.rounds
    if not any(e["event"] == "inner_step" for e in events):
        return ("no site called diloco.step(): the script trained nothing through geotrain" if script
                else "no site took an inner step")
    done = rounds_completed(events, topo)
    if done < planned:
        who = "the script" if script else "the run"
        return f"{who} exited after round {done} of {planned} (training.rounds)"
    return None


def history_failure(events: list[dict], topo: Topology, script: bool = False) -> str | None:
    """Why a run whose processes all ended well still failed, from its history (None: it did not): the global
    model went non-finite (:func:`model_failure`), or rounds are missing (:func:`shortfall`)."""
    diverged = model_failure(events)
    if diverged is not None:
        return f"the global model went non-finite: {diverged}"
    return shortfall(events, topo, script=script)


def last_metrics(events: list[dict]) -> dict:
    """The scripts' own scalars (``metric`` events, geotrain.worker.metrics) and named evals: per name, the
    last value at each site (rank 0's where several ranks log), and the last step it was logged at."""
    from geotrain.worker.metrics import scalars_of

    out: dict[str, dict] = {}
    leaders = {e.get("site") for e in events if e.get("event") == "metric" and e.get("rank", 0) == 0}
    for e in events:
        kind = e.get("event")
        if kind == "metric":
            if e.get("rank", 0) != 0 and e.get("site") in leaders:
                continue
            items = list(scalars_of(e).items())
        elif kind == "eval" and e.get("metric"):
            items = [(f"eval/{e['metric']}", e.get("loss"))]
        else:
            continue
        for name, value in items:
            v = number(value)
            if v is None:
                continue
            m = out.setdefault(name, {"sites": {}, "step": None})
            m["sites"][str(e.get("site"))] = v if math.isfinite(v) else str(v)
            m["step"] = e.get("step")
    return out


def goodput(events: list[dict], topo: Topology, wall_seconds: float) -> tuple[float | None, float | None]:
    """(goodput, utilisation) of a run: compute time whose work reached the global model, and all compute
    time, each over sites x wall time. A site's inner steps of round r count as useful when a commit of
    round r includes that site (lost to a fault, refused, late for a quorum: not useful), each step once: the
    steps a restarted site took before it died and then took again are lost work. Synchronous
    DiLoCo only (the other algorithms' steps do not map to one round); utilisation for every algorithm."""
    sites = len(topo.sites)
    if wall_seconds <= 0 or not sites:
        return None, None
    steps = [e for e in events if e.get("event") == "inner_step"]
    total = sum(number(e.get("compute_s")) or 0.0 for e in steps)
    utilisation = round(total / (sites * wall_seconds), 4)
    if topo.training.algorithm != "diloco":
        return None, utilisation
    counted = {(site, c.get("round")) for c in events if c.get("event") == "commit" for site in c.get("sites") or ()}
    # a site that restarts redoes the steps of its unfinished round: only the last time a step was taken counts
    last = {(e.get("site"), e.get("step")): e for e in steps}
    useful = sum(number(e.get("compute_s")) or 0.0 for e in last.values() if (e.get("site"), e.get("round")) in counted)
    return round(useful / (sites * wall_seconds), 4), utilisation


PLAINTEXT_WARNING = ("security.tls is false: every channel of this run (coordinator, rings, etcd) is plaintext and "
                     "unauthenticated; any process that reaches a port can read the model, act as a site or "
                     "rewrite the run's state in etcd")


def security_summary(topo: Topology) -> dict:
    """summary.json's ``security``: whether the run's channels were mutual TLS, and a warning when not."""
    out: dict = {"tls": topo.security.tls}
    if not topo.security.tls:
        out["warning"] = PLAINTEXT_WARNING
    elif topo.etcd.endpoint is not None and topo.etcd.ca_file is None:
        out["warning"] = f"the external etcd {topo.etcd.endpoint} is reached in plaintext (no etcd.ca_file)"
    return out


def _by_site(events: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in events:
        out.setdefault(e.get("site"), []).append(e)
    return out


def compute_summary(events: list[dict], topo: Topology, *, wall_seconds: float, link_stats: dict[str, dict]) -> dict:
    tr = topo.training
    evals = sorted((e for e in events if e["event"] == "eval"), key=lambda e: (e["step"], e["t"]))
    steps = [e for e in events if e["event"] == "inner_step"]
    merges = [e for e in events if e["event"] == "merge"]
    rounds = rounds_completed(events, topo)
    useful, utilisation = goodput(events, topo, wall_seconds)
    sites = {}
    steps_of, merges_of = _by_site(steps), _by_site(merges)  # once: a filter per site was O(sites x events)
    for s in topo.sites:
        mine, my_merges = steps_of.get(s.name, []), merges_of.get(s.name, [])
        compute = sum(e.get("compute_s") or 0.0 for e in mine)
        sites[s.name] = {
            "workers": s.world_size,
            "inner_steps": sum(int(e.get("steps", 1)) for e in mine),  # a simulation may write one event per run
            "compute_seconds": round(compute, 3),
            "wan_wait_seconds": round(sum(e["seconds"] for e in my_merges), 3),
            "merges": len(my_merges),
            "bytes_sent": sum(e.get("bytes_sent", 0) for e in my_merges),
            "bytes_received": sum(e.get("bytes_received", 0) for e in my_merges),
        }
    # tokens only where the model declared them (DiLoCo(tokens_per_step=...); the built-in trainer does)
    workers = {s.name: s.world_size for s in topo.sites}
    declared = [e for e in steps if number(e.get("tokens")) is not None]
    tokens = sum(int(e["tokens"]) * workers.get(e.get("site"), 1) for e in declared) if declared else None
    failures = [e for e in events if e["event"] == "failure"]
    recoveries = [e for e in events if e["event"] == "recovery"]
    done = [e for e in events if e["event"] == "site_done"]
    links = {name: {"bytes_forward": st.get("bytes_forward", 0), "bytes_backward": st.get("bytes_backward", 0)}
             for name, st in link_stats.items()}
    return {
        "run": topo.name,
        "algorithm": tr.algorithm,
        "rounds_planned": tr.rounds,
        "rounds_completed": rounds,
        "initial_eval_loss": evals[0]["loss"] if evals and evals[0]["step"] == 0 else None,
        "final_eval_loss": evals[-1]["loss"] if evals else None,
        "eval_metric": evals[-1].get("metric") if evals else None,
        "eval_losses": [[e["round"], e["step"], e["loss"]] for e in evals],
        "wan_bytes": sum(v["bytes_forward"] + v["bytes_backward"] for v in links.values()),
        "links": links,
        "wall_seconds": round(wall_seconds, 3),
        "model": next(({k: e.get(k) for k in ("params", "flops_per_token", "preset", "vocab_size", "device", "bf16")}
                       for e in events if e["event"] == "model"), None),
        "tokens": tokens,
        "tokens_per_second": round(tokens / wall_seconds, 1) if tokens is not None and wall_seconds > 0 else None,
        "metrics": last_metrics(events),
        "sites": sites,
        "failures": len(failures),
        "recoveries": len(recoveries),
        "rounds_lost": sum(e.get("rounds_lost", 0) for e in recoveries),
        "recovery_seconds": [round(e["seconds"], 3) for e in recoveries],
        "failure_log": [{"what": e.get("what"), "target": e.get("target"), "t": e["t"], "reason": e.get("reason")}
                        for e in failures],
        "security": security_summary(topo),
        "goodput": useful,
        "utilisation": utilisation,
        "faults_drawn": sum(1 for e in events if e["event"] == "fault_injected" and e.get("drawn")),
        "checkpoint_stall_seconds": round(sum(e.get("checkpoint_stall_s", 0.0) for e in done), 6),
    }


def write_summary(run_dir: Path, topo: Topology, *, wall_seconds: float, link_stats: dict[str, Path],
                  status: str, reason: str | None) -> dict:
    stats = {}
    for name, path in link_stats.items():
        try:
            stats[name] = json.loads(Path(path).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            stats[name] = {}
    summary = {"status": status, "reason": reason,
               **compute_summary(read_events(run_dir / "metrics.jsonl"), topo, wall_seconds=wall_seconds, link_stats=stats)}
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, run_dir / "summary.json")
    return summary
