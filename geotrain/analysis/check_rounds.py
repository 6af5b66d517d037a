"""The history checker's invariants about rounds and versions (see geotrain.analysis.check).

``rounds_committed_once_in_order``, ``version_never_backwards``, ``only_committed_versions_served``,
``no_committed_round_lost`` and ``no_stale_update_applied``: each is a pure function of the events
(in file order) that returns one :class:`~geotrain.analysis.history.Verdict`. Rounds from a
*rebase* on (a launch's first coordinator, docs in geotrain.analysis.history) are redone on
purpose; a coordinator *restart* inside a launch must carry on where the last one stopped.
"""

from __future__ import annotations

from typing import Sequence

from geotrain.analysis.history import (HELD, UNKNOWN, VIOLATED, Restart, Verdict, and_more, as_int, at_line, of_kind,
                                       rounds_span, shape)

# ---------------------------------------------------------------------------------------------
# 1. rounds_committed_once_in_order


def rounds_committed_once_in_order(events: Sequence[dict]) -> Verdict:
    name = "rounds_committed_once_in_order"
    commits = of_kind(events, "commit")
    if not commits:
        return Verdict(name, UNKNOWN, "no commit events")
    rebases, restarts = shape(events)
    seen: dict[int, int] = {}  # round -> line of its commit (in the current timeline)
    expected = 0
    problems: list[str] = []
    notes: list[str] = []
    for i, e in enumerate(events):
        if i in rebases:
            rb = rebases[i]
            if rb.round is not None:
                # rounds from the rebase on are redone (resume from a checkpoint): forget them
                seen = {r: line for r, line in seen.items() if r < rb.round}
                expected = rb.round
            if rb.how != "start":
                notes.append(rb.how)
            continue
        if i in restarts:
            rs = restarts[i]
            if rs.round is not None and rs.round == expected + 1 and expected not in seen:
                # the previous incarnation made round `expected` durable and died before recording its
                # commit; the new one says so by starting at the round after it
                seen[expected] = i
                notes.append(f"round {expected} committed without a commit event (restart at {at_line(i)} started at round {rs.round})")
                expected = rs.round
            continue
        if e.get("event") != "commit":
            continue
        rnd = as_int(e.get("round"))
        if rnd is None:
            problems.append(f"commit at {at_line(i)} has no integer round ({e.get('round')!r})")
            continue
        if rnd in seen:
            epoch = f" (epoch {e['epoch']})" if "epoch" in e else ""
            problems.append(f"round {rnd} committed twice ({at_line(seen[rnd])} and {at_line(i)}){epoch}")
            expected = max(expected, rnd + 1)
            continue
        if rnd > expected:
            missing = f"round {expected}" if rnd == expected + 1 else f"rounds {expected}-{rnd - 1}"
            problems.append(f"gap: {missing} never committed, {at_line(i)} commits round {rnd}")
        elif rnd < expected:
            problems.append(f"out of order: {at_line(i)} commits round {rnd} after round {expected - 1}")
        seen[rnd] = i
        expected = max(expected, rnd + 1)
    if problems:
        return Verdict(name, VIOLATED, f"{len(commits)} commits; first: {problems[0]}{and_more(problems)}")
    note = f"; {'; '.join(notes)}" if notes else ""
    return Verdict(name, HELD, f"{len(commits)} commits, {rounds_span(sorted(seen))}, each once, in order, no gap{note}")


# ---------------------------------------------------------------------------------------------
# 2. version_never_backwards


def version_never_backwards(events: Sequence[dict]) -> Verdict:
    name = "version_never_backwards"
    rebases, _ = shape(events)
    problems: list[str] = []
    n_commits = n_merges = n_ready = 0
    last_commit: tuple[int, int] | None = None      # (version, line) of the newest commit
    per_site: dict[str, tuple[int, int]] = {}       # site -> (newest merge version, line)
    committed: int | None = None                    # the newest committed version (file order)
    at_join: dict[str, int | None] = {}             # site -> the floor its next site_ready must reach
    merging_sites: set[str] = set()
    for i, e in enumerate(events):
        kind = e.get("event")
        if i in rebases:
            rb = rebases[i]
            if rb.round is not None:  # a resume goes back to its checkpoint on purpose
                last_commit, per_site, committed, at_join = (rb.round, i), {}, rb.round, {}
            continue
        if kind == "commit":
            v = as_int(e.get("version"))
            if v is None:
                continue
            n_commits += 1
            if last_commit is not None and v <= last_commit[0]:
                problems.append(f"commit at {at_line(i)} has version {v} after version {last_commit[0]} ({at_line(last_commit[1])})")
            if last_commit is None or v > last_commit[0]:
                last_commit = (v, i)
            committed = v if committed is None else max(committed, v)
        elif kind == "merge":
            v, site = as_int(e.get("version")), e.get("site")
            if v is None or site is None:
                continue
            n_merges += 1
            merging_sites.add(site)
            prev = per_site.get(site)
            if prev is not None and v < prev[0]:
                problems.append(f"site {site} merged version {v} at {at_line(i)} after version {prev[0]} ({at_line(prev[1])})")
            if prev is None or v > prev[0]:
                per_site[site] = (v, i)
        elif kind == "site_joined" and e.get("site") is not None:
            # The coordinator writes site_joined and commit under one lock and the site asks for a
            # model of at least the version it was told at join: the join is the sound anchor (a
            # commit recorded between the join and site_ready is not a counter-example).
            floors = [f for f in (committed, as_int(e.get("start_version"))) if f is not None]
            at_join[e["site"]] = max(floors) if floors else None
        elif kind == "site_ready":
            v, site = as_int(e.get("version")), e.get("site")
            if v is None:
                continue
            n_ready += 1
            floor = at_join.pop(site) if site in at_join else committed
            if floor is not None and v < floor:
                problems.append(f"site {site} ready at version {v} ({at_line(i)}) but version {floor} was already committed")
    checked = f"{n_commits} commit versions, {n_merges} merges over {len(merging_sites)} sites, {n_ready} site_ready"
    if problems:
        return Verdict(name, VIOLATED, f"{checked}; first: {problems[0]}{and_more(problems)}")
    if n_commits == 0 and n_merges == 0 and n_ready == 0:
        return Verdict(name, UNKNOWN, "no commit, merge or site_ready event carries a version")
    return Verdict(name, HELD, f"{checked}; no version went backwards")


# ---------------------------------------------------------------------------------------------
# 2b. only_committed_versions_served


def only_committed_versions_served(events: Sequence[dict]) -> Verdict:
    """A site only ever holds a version the history committed (or a coordinator declared it
    restored): the coordinator records a commit before anyone can receive its result, so a
    ``site_ready`` or ``merge`` version above every commit so far is weights no commit produced."""
    name = "only_committed_versions_served"
    rebases, restarts = shape(events)
    ceiling = 0
    n = n_ckpt = 0
    problems: list[str] = []
    for i, e in enumerate(events):
        kind = e.get("event")
        if i in rebases:
            if rebases[i].round is not None:
                ceiling = rebases[i].round
            continue
        if i in restarts:
            if restarts[i].round is not None:
                ceiling = max(ceiling, restarts[i].round)
            continue
        if kind == "commit":
            v = as_int(e.get("version"))
            if v is not None:
                ceiling = max(ceiling, v)
        elif kind in ("site_ready", "merge", "checkpoint_saved"):
            # a checkpoint's round is the version it saved (the number of rounds committed)
            v = as_int(e.get("round" if kind == "checkpoint_saved" else "version"))
            if v is None:
                continue
            n += 1
            n_ckpt += kind == "checkpoint_saved"
            if v > ceiling:
                who = {"site_ready": f"site {e.get('site')} ready at", "merge": f"site {e.get('site')} merged",
                       "checkpoint_saved": "checkpoint saved of"}[kind]
                problems.append(f"{who} version {v} ({at_line(i)}) but the newest committed version was {ceiling}")
    if problems:
        return Verdict(name, VIOLATED, f"{n} versions held by sites or checkpoints; first: {problems[0]}{and_more(problems)}")
    if n == 0:
        return Verdict(name, UNKNOWN, "no site_ready, merge or checkpoint_saved event carries a version")
    return Verdict(name, HELD, f"{n} versions held ({n - n_ckpt} by sites, {n_ckpt} in checkpoints), each one committed before")


# ---------------------------------------------------------------------------------------------
# 5. no_committed_round_lost


def no_committed_round_lost(events: Sequence[dict]) -> Verdict:
    name = "no_committed_round_lost"
    commits = of_kind(events, "commit")
    if not commits:
        return Verdict(name, UNKNOWN, "no commit events")
    rebases, restarts = shape(events)
    problems: list[str] = []
    notes: list[str] = []
    checked = unchecked = 0
    last_round, last_version = -1, None   # newest committed round / version of the current timeline
    pending: Restart | None = None       # a restart whose first commit is still to come
    for i, e in enumerate(events):
        if i in rebases:
            rb = rebases[i]
            if pending is not None:
                unchecked += 1
                pending = None
            if rb.asked is not None and rb.declared is not None and rb.declared != rb.asked:
                problems.append(f"resume from checkpoint round {rb.asked} but the coordinator started at round "
                                f"{rb.declared} ({at_line(i)})")
            if rb.asked is None and rb.declared is not None and 0 < rb.declared <= last_round:
                # a relaunch (not `geotrain resume`) starts from the coordinator's persisted state,
                # which is saved before a commit is recorded: it can never be behind the history
                problems.append(f"relaunch at {at_line(i)}: the coordinator started at round {rb.declared} but round "
                                f"{last_round} was committed; committed round lost")
            if rb.how != "start":
                notes.append(rb.how)
            if rb.round is not None:
                last_round, last_version = rb.round - 1, (rb.round if rb.round > 0 else None)
            continue
        if i in restarts:
            rs = restarts[i]
            if pending is not None:
                unchecked += 1
            pending = rs
            epoch = f" (epoch {rs.event['epoch']})" if "epoch" in rs.event else ""
            if rs.round is not None and rs.round < last_round + 1:
                problems.append(f"coordinator restart at {at_line(i)}{epoch} started at round {rs.round} but round "
                                f"{last_round} was committed; committed round lost")
            continue
        if e.get("event") != "commit":
            continue
        rnd, ver = as_int(e.get("round")), as_int(e.get("version"))
        if pending is not None:
            checked += 1
            rs, pending = pending, None
            epoch = f" (epoch {rs.event['epoch']})" if "epoch" in rs.event else ""
            if rnd is not None and rnd < last_round + 1:
                problems.append(f"coordinator restart at {at_line(rs.line)}{epoch}: first commit after it is round {rnd} "
                                f"({at_line(i)}) but round {last_round} was committed before; committed round lost")
            elif ver is not None and last_version is not None and ver <= last_version:
                problems.append(f"coordinator restart at {at_line(rs.line)}{epoch}: first commit after it has version {ver} "
                                f"({at_line(i)}) but version {last_version} was committed before")
        if rnd is not None:
            last_round = max(last_round, rnd)
        if ver is not None:
            last_version = ver if last_version is None else max(last_version, ver)
    if pending is not None:
        unchecked += 1
    n_restarts = len(restarts)
    if problems:
        return Verdict(name, VIOLATED, f"{n_restarts} coordinator restarts, {len(commits)} commits; "
                                       f"first: {problems[0]}{and_more(problems)}")
    note = f"; {'; '.join(notes)}" if notes else ""
    if n_restarts == 0:
        return Verdict(name, HELD, f"no coordinator restart; {len(commits)} commits{note}")
    if checked == 0:
        return Verdict(name, UNKNOWN, f"{n_restarts} coordinator restarts, but no commit after any of them{note}")
    extra = f" ({unchecked} with no commit after it)" if unchecked else ""
    return Verdict(name, HELD, f"{n_restarts} coordinator restarts{extra}; after each, the next commit continued from "
                               f"the last committed round and version; {len(commits)} commits{note}")


# ---------------------------------------------------------------------------------------------
# 8. no_stale_update_applied


def no_stale_update_applied(events: Sequence[dict]) -> Verdict:
    name = "no_stale_update_applied"
    commits = of_kind(events, "commit")
    if not commits:
        return Verdict(name, UNKNOWN, "no commit events")
    known: set[str] = set()
    declared = False
    problems: list[str] = []
    max_round: tuple[int, int] | None = None  # (round, line)
    contributions = 0
    rebases, _ = shape(events)
    for i, e in enumerate(events):
        kind = e.get("event")
        if i in rebases and rebases[i].round is not None:
            max_round = None  # rounds from the rebase on are redone on purpose
        if kind in ("run_started", "coordinator_started") and isinstance(e.get("sites"), list):
            known.update(str(s) for s in e["sites"])
            declared = True
        elif kind == "site_joined" and e.get("site") is not None:
            known.add(str(e["site"]))
            declared = True
        elif kind == "commit":
            sites = e.get("sites")
            rnd = as_int(e.get("round"))
            if isinstance(sites, list):
                contributions += len(sites)
                names = [str(s) for s in sites]
                dup = sorted({s for s in names if names.count(s) > 1})
                if dup:
                    problems.append(f"commit of round {rnd} ({at_line(i)}) applied {', '.join(map(str, dup))} twice")
                strangers = sorted(set(names) - known) if declared else []
                if strangers:
                    problems.append(f"commit of round {rnd} ({at_line(i)}) applied an update from "
                                    f"{', '.join(strangers)}, never part of the run")
            if rnd is not None:
                if max_round is not None and rnd < max_round[0]:
                    problems.append(f"commit of round {rnd} ({at_line(i)}) after round {max_round[0]} "
                                    f"was committed ({at_line(max_round[1])})")
                if max_round is None or rnd > max_round[0]:
                    max_round = (rnd, i)
    refused = of_kind(events, "merge_refused")
    stale = sum(1 for _, e in refused if e.get("action") == "stale")
    refused_text = f"{len(refused)} updates refused ({stale} stale)"
    if problems:
        more = and_more(problems)
        return Verdict(name, VIOLATED, f"{len(commits)} commits, {refused_text}; first: {problems[0]}{more}")
    return Verdict(name, HELD, f"{len(commits)} commits applied {contributions} site updates, each once, "
                               f"none for an old round; {refused_text}")
