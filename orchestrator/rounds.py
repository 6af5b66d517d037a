"""The coordinator's decisions, as pure functions of (now, state, config).

Nothing here touches gRPC, etcd or a clock: the servicer feeds events in (a site's update
arrived, time passed) and acts on the returned decision. Each decision carries a reason a
person can read, and tests assert on decisions and reasons without sockets or sleeps.

The round protocol (synchronous DiLoCo): round r collects one update from every expected site,
each based on global version r. When all have arrived the round is committed: version r+1 is
the outer step applied to the mean update, and round r+1 starts. If the round's deadline passes
(counted from its first arrival) and at least ``min_sites`` sites reported, it commits with
those, and the silent sites leave the membership; a site that (re)joins while a round is being
collected becomes a member from the next round on and starts from the version that round commits.

A member declared dead (:func:`lose`: its leader's etcd lease was lost, or its supervisor reported its
process's exit) does not hold the others up: the round stops waiting for it at once and commits with the
survivors when they have all reported (if ``recovery.min_sites`` allows); its restart rejoins at a
later round. A dead site whose update had already arrived still counts in its round, and leaves after it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class RoundState:
    """What the coordinator knows about the round it is collecting."""

    round: int = 0
    """The round being collected (== number of rounds committed so far)."""
    expected: frozenset[str] = frozenset()
    """Sites whose update this round waits for."""
    arrived: dict[str, float] = field(default_factory=dict)
    """Site -> time its update for this round arrived."""
    started_at: float | None = None
    """When the first update of this round arrived (the round deadline counts from there)."""
    joining: frozenset[str] = frozenset()
    """Sites that joined during this round; members from the next round on."""
    lost: frozenset[str] = frozenset()
    """Sites declared dead after their update for this round arrived: it counts, and they leave when it commits."""
    opened_at: float | None = None
    """When the round began (the previous one committed); None for the first round of a coordinator."""
    last_round_s: float | None = None
    """How long the previous round took, commit to commit (None: unknown); the join window is a part of it."""

    @property
    def version(self) -> int:
        return self.round


@dataclass(frozen=True)
class Decision:
    action: str
    """accept | stale | future | unknown_site | duplicate | commit | commit_partial | wait | timeout |
    member | join_now | join_next | run_done; a member declared dead: drop_lost | leave_after | forget_joiner |
    keep_waiting | ignore; ring rounds: ring | star | ring_abandoned | abandon_ring | abandon;
    an update's values: wrong_dtype | wrong_length | non_finite | norm_bound; a refused one: drop | ignore"""
    reason: str

    def __bool__(self) -> bool:
        return self.action in ("accept", "commit", "commit_partial", "commit_quorum")


def admit(state: RoundState, site: str, round: int) -> Decision:
    """May ``site``'s update for ``round`` join the round being collected?"""
    if site not in state.expected:
        return Decision("unknown_site", f"site {site!r} is not a member of round {state.round} "
                                        f"(members: {', '.join(sorted(state.expected)) or 'none'})")
    if round < state.round:
        return Decision("stale", f"update from {site!r} is for round {round}, which is already committed "
                                 f"(collecting round {state.round}); refused, never applied twice")
    if round > state.round:
        return Decision("future", f"update from {site!r} is for round {round}, but round {state.round} is not "
                                  f"committed yet; the site must first fetch version {state.round}")
    if site in state.arrived:
        return Decision("duplicate", f"site {site!r} already contributed to round {round}")
    return Decision("accept", f"update from {site!r} accepted for round {round}")


MIN_NORM_HISTORY = 2
"""The norm bound applies once at least this many accepted updates' norms are known."""


def validate_update(site: str, round: int, *, dtype: str, expected_numel: int | None, declared_numel: int,
                    received_numel: int, norm: float, history: tuple[float, ...] | list[float],
                    ratio: float | None, what: str = "") -> Decision:
    """May the values of ``site``'s update for ``round`` count? (before any state changes)

    ``expected_numel`` is the model's number of parameters (streaming: the fragment's; None while the
    coordinator has no model); ``declared_numel`` what the stream's header said, ``received_numel``
    what arrived; ``norm`` the update's L2 norm (not finite when any value is not);
    ``history`` the norms of the last accepted updates, oldest first; ``ratio``
    (``security.max_update_norm_ratio``, None: no bound) bounds ``norm`` by that multiple of the
    history's median, once the history holds at least :data:`MIN_NORM_HISTORY` norms (and that
    median is not 0). ``what`` names the values in the reason (default: the update). The history lives in the coordinator's memory only: after a restart the bound
    starts over (it is not persisted; a few rounds rebuild it).
    """
    who = what or f"update from {site!r} for round {round}"
    if received_numel == 0:
        return Decision("wrong_length", f"{who} is empty; refused")
    if dtype != "float32":
        return Decision("wrong_dtype", f"{who} has dtype {dtype}, the model's is float32; refused")
    if declared_numel != received_numel:
        return Decision("wrong_length", f"{who} declares {declared_numel} values but carries {received_numel}; refused")
    if expected_numel is not None and received_numel != expected_numel:
        return Decision("wrong_length", f"{who} has {received_numel} values, the model {expected_numel}; refused")
    if not math.isfinite(norm):
        return Decision("non_finite", f"{who} carries a non-finite value (NaN or infinity); refused")
    if ratio is not None and len(history) >= MIN_NORM_HISTORY:
        median = statistics.median(history)
        if median > 0 and norm > ratio * median:  # all-zero history: nothing to measure against
            return Decision("norm_bound", f"{who} has L2 norm {norm:.6g}, more than {ratio:g} x the median "
                                          f"{median:.6g} of the last {len(history)} accepted updates; refused")
    return Decision("accept", f"{who}: {received_numel} finite values, L2 norm {norm:.6g}")


def refuse_update(state: RoundState, site: str, round: int, why: str) -> tuple[RoundState, Decision]:
    """An update whose values were refused (validate_update, for ``why``): if it was ``site``'s
    contribution to the round being collected, the site fails that round: it leaves the round's
    expected set (like a site dropped at the deadline; it may rejoin), so that the round goes on with
    the others and a later honest copy is not a duplicate. Otherwise (a stale, future, duplicate or
    stranger's update) nothing changes. Returns the new state and ``drop`` or ``ignore``."""
    if round != state.round or site not in state.expected or site in state.arrived:
        return state, Decision("ignore", f"the refused update of {site!r} ({why}) was not its contribution to "
                                         f"round {state.round}: the round is unchanged")
    return replace(state, expected=state.expected - {site}), \
        Decision("drop", f"{site!r} fails round {round} ({why}): the round goes on without it; it may rejoin")


def record_arrival(state: RoundState, site: str, now: float) -> RoundState:
    arrived = dict(state.arrived)
    arrived[site] = now
    return replace(state, arrived=arrived, started_at=state.started_at if state.started_at is not None else now)


def round_ready(now: float, state: RoundState, timeout_s: float, min_sites: int | None = None,
                quorum: int | None = None, grace_s: float = 0.0) -> Decision:
    """Is the round complete, still waiting, or past its deadline (and then: enough sites or not)?

    With a ``quorum`` (training.quorum, after Decoupled DiLoCo, arXiv 2604.21428) the round also commits
    once ``quorum`` sites have reported and ``grace_s`` has passed since the quorum-th arrival
    (``commit_quorum``); the late sites stay members (:func:`leaving`), their late update is refused
    as stale and they rejoin at the next round's version."""
    missing = sorted(state.expected - set(state.arrived))
    if not missing and state.arrived:
        return Decision("commit", f"all {len(state.expected)} sites reported for round {state.round}")
    grace_wait = None
    if quorum is not None and len(state.arrived) >= quorum:
        kth = sorted(state.arrived.values())[quorum - 1]
        since = kth - (state.started_at if state.started_at is not None else kth)
        if now - kth >= grace_s:
            return Decision("commit_quorum", f"round {state.round}: quorum of {quorum} reached {since:.1f}s after its "
                                             f"first update and the grace of {grace_s:g}s passed; committing with "
                                             f"{', '.join(sorted(state.arrived))}; late: {', '.join(missing)}")
        grace_wait = Decision("wait", f"round {state.round}: quorum of {quorum} reached; waiting up to "
                                      f"{kth + grace_s - now:.1f}s more for {', '.join(missing)}")
    if state.started_at is not None and now - state.started_at > timeout_s:
        need = len(state.expected) if min_sites is None else min_sites
        if len(state.arrived) >= need:
            return Decision("commit_partial", f"round {state.round}: deadline of {timeout_s:.1f}s passed; committing with "
                                              f"{', '.join(sorted(state.arrived))}; dropping {', '.join(missing)}")
        return Decision("timeout", f"round {state.round}: no update from {', '.join(missing)} within "
                                   f"{timeout_s:.1f}s of the first arrival, and {len(state.arrived)} sites "
                                   f"are fewer than the {need} required")
    if grace_wait is not None:
        return grace_wait
    return Decision("wait", f"round {state.round}: waiting for {', '.join(missing)}")


def leaving(state: RoundState, ready: Decision) -> frozenset[str]:
    """Who leaves the membership when the round commits with ``ready``: the silent sites at a deadline
    (``commit_partial``: they failed, and rejoin when they come back); nobody at a quorum commit
    (``commit_quorum``: the late sites are slow, not gone) or when all reported."""
    if ready.action == "commit_partial":
        return frozenset(state.expected - set(state.arrived))
    return frozenset()


def lose(state: RoundState, site: str, why: str, min_sites: int | None) -> tuple[RoundState, Decision]:
    """``site`` was declared dead (``why``: its leader's etcd lease was lost, its supervisor saw it exit).
    Returns the new state and what that means for the round being collected:

    - ``drop_lost``: it had not reported; the round stops waiting for it (it leaves ``expected``) and may
      commit at once with the others (:func:`round_ready` decides); it rejoins when it is back;
    - ``leave_after``: its update for this round arrived and counts; it leaves when the round commits;
    - ``forget_joiner``: it was joining this round; it is not a member of the next one either;
    - ``keep_waiting``: without it fewer than ``min_sites`` (``recovery.min_sites``; None: every member
      must report, no partial commits) would remain: nothing changes, the round waits for it to come
      back until its deadline, as before;
    - ``ignore``: it is not a member of this round (dropped before, or never joined).
    """
    r = state.round
    if site in state.joining:
        return replace(state, joining=state.joining - {site}), \
            Decision("forget_joiner", f"{site!r} was declared dead ({why}) while joining round {r + 1}: "
                                      f"it is not a member until it joins again")
    if site not in state.expected:
        return state, Decision("ignore", f"{site!r} was declared dead ({why}) but is not a member of round {r}")
    if site in state.arrived:
        return replace(state, lost=state.lost | {site}), \
            Decision("leave_after", f"{site!r} was declared dead ({why}) after its update for round {r} arrived: "
                                    f"the update counts; it leaves the membership when round {r} commits")
    rest = state.expected - {site}
    if min_sites is None or len(rest) < min_sites:
        need = "every member must report" if min_sites is None else f"recovery.min_sites is {min_sites}"
        return state, Decision("keep_waiting", f"{site!r} was declared dead ({why}), but round {r} cannot go on "
                                               f"without it ({len(rest)} sites would remain; {need}): the round "
                                               f"waits for it to come back, until its deadline")
    return replace(state, expected=rest), \
        Decision("drop_lost", f"{site!r} was declared dead ({why}) before reporting round {r}: the round goes on "
                              f"with {', '.join(sorted(rest))} at once; it rejoins when it is back")


JOIN_WINDOW = 0.1
"""A site (re)joins the round being collected only within this fraction of a round's time from its start."""


def join(state: RoundState, site: str, now: float | None = None,
         final_round: int | None = None) -> tuple[RoundState, int, Decision]:
    """A site (re)joins. Returns the new state, the global version it must start from, and why.

    It joins the round being collected if no update of it has arrived and (given ``now``) the round is
    young: begun at most :data:`JOIN_WINDOW` of the previous round's time ago. A site joining later would
    report that much after the others, who would wait for it (a restarted site must not hold up the ones
    that never stopped); it joins the next round instead, and starts with everyone from its version.
    Once every planned round (``final_round``: training.rounds) is committed there is no round to join: the
    site starts from the final version (``run_done``), and is done."""
    if final_round is not None and state.round >= final_round:
        return state, state.round, Decision("run_done", f"{site!r} joins after the last round ({final_round}) was "
                                                        f"committed: it takes the final version {state.round}")
    if site in state.lost:  # back from the dead within the round its update counts in: the next one is its
        return replace(state, lost=state.lost - {site}, joining=state.joining | {site}), state.round + 1, \
            Decision("join_next", f"{site!r} joins at round {state.round + 1}; its update for round "
                                  f"{state.round} counts already")
    if site in state.expected:
        return state, state.round, Decision("member", f"{site!r} is a member of round {state.round}")
    late = None
    if now is not None and state.opened_at is not None and state.last_round_s is not None:
        since, window = now - state.opened_at, JOIN_WINDOW * state.last_round_s
        late = None if since <= window else (since, window)
    if not state.arrived and late is None:
        return replace(state, expected=state.expected | {site}), state.round, \
            Decision("join_now", f"{site!r} joins round {state.round}, which has no update yet")
    if late is not None and not state.arrived:
        return replace(state, joining=state.joining | {site}), state.round + 1, \
            Decision("join_next", f"{site!r} joins at round {state.round + 1}; round {state.round} began {late[0]:.1f}s "
                                  f"ago, past the join window of {late[1]:.1f}s ({JOIN_WINDOW:g} of the last round's "
                                  f"{state.last_round_s:.1f}s): joining it would hold the others up")
    return replace(state, joining=state.joining | {site}), state.round + 1, \
        Decision("join_next", f"{site!r} joins at round {state.round + 1}; round {state.round} is already being collected")


def next_round(state: RoundState, dropped: frozenset[str] = frozenset(), now: float | None = None) -> RoundState:
    """The state after committing the current round (at ``now``, if known): silent and dead sites dropped,
    joiners added."""
    took = now - state.opened_at if now is not None and state.opened_at is not None else None
    return RoundState(round=state.round + 1, expected=(state.expected - dropped - state.lost) | state.joining,
                      opened_at=now, last_round_s=took)


RING_BACKOFF_MAX = 16
"""At most this many rounds between two attempts to rebuild the rings."""


def ring_reform(committed: int, *, sites: frozenset[str], arrived: frozenset[str], next_expected: frozenset[str],
                failures: int, abandoned_at: int) -> Decision:
    """After round ``committed`` was merged through the star in a ring (or hierarchical) run: do the
    leaders rebuild their rings for the next round?

    Rings need every site of the topology: each ring's size is fixed by the plan. So the round just
    committed must have every site's update, and the next round must expect exactly every site (no
    one dropped, no one joining). ``failures`` ring rounds in a row were abandoned, the last at round
    ``abandoned_at``; after the first the rings are rebuilt at once (a dead leader came back), after
    each further one the wait doubles (1, 2, 4, ... rounds, at most ``RING_BACKOFF_MAX``), so that a
    ring that cannot form (a dead ring link, say) costs a star round most of the time, not a timeout.
    Returns ``ring`` (rebuild for round committed+1) or ``star``.
    """
    nxt = committed + 1
    missing = sorted(sites - arrived)
    if missing:
        return Decision("star", f"round {committed} was committed without {', '.join(missing)}: "
                                f"round {nxt} merges through the star")
    if next_expected != sites:
        changed = sorted(next_expected ^ sites)
        return Decision("star", f"membership changes at round {nxt} ({', '.join(changed)}): it merges through the star")
    wait = min(RING_BACKOFF_MAX, 2 ** (failures - 1)) if failures > 0 else 1
    if failures > 0 and nxt < abandoned_at + wait:
        return Decision("star", f"the rings failed {failures} time(s) in a row, last at round {abandoned_at}: "
                                f"next attempt at round {abandoned_at + wait}")
    return Decision("ring", f"every site reported round {committed}: the leaders rebuild their rings for round {nxt}")


# ---- ring rounds ----

def merge_mode(recorded: str | None, ring_update: bool, round: int, collecting: int) -> Decision:
    """How an update meets the way its round is merged (ring and hierarchical runs).

    A round's first update pins its mode: ``ring`` (a ``ring_mean``/``ring_ack``) or ``star``.
    Then a ring update for a round merged through the star is refused (``ring_abandoned``); a star
    update for the round being collected in a ring means the ring broke (``abandon_ring``: the round
    goes through the star, the ring updates are dropped). Otherwise the action is the round's mode.
    """
    if recorded is None:
        mode = "ring" if ring_update else "star"
        return Decision(mode, f"round {round}'s first update: merged {'in a ring' if ring_update else 'through the star'}")
    if ring_update and recorded != "ring":
        return Decision("ring_abandoned", f"round {round} is merged through the star")
    if not ring_update and recorded == "ring" and round == collecting:
        return Decision("abandon_ring", f"a star update for round {round}, being merged in a ring: "
                                        f"the ring broke; the round goes through the star")
    return Decision(recorded, f"round {round} is merged {'in a ring' if recorded == 'ring' else 'through the star'}")


def ring_commit(round: int, ready: Decision, uploaded: tuple[int, ...], claimed: frozenset[int]) -> Decision:
    """Can ring round ``round`` commit? ``ready`` is :func:`round_ready`'s decision, ``uploaded`` the
    CRC32s of the means uploaded, ``claimed`` the CRC32s the leaders claimed for the mean they computed.

    It commits only if every member reported (a ring cannot lose a site), exactly one mean was
    uploaded and every leader claims that mean; otherwise (``abandon``) it is retried through the star.
    """
    if len(uploaded) != 1 or ready.action != "commit" or claimed != {uploaded[0]}:
        return Decision("abandon", f"ring round {round} cannot commit ({ready.action}; {len(uploaded)} means uploaded; "
                                   f"claimed mean CRC32s {sorted(claimed)}): retried through the star")
    return Decision("commit", f"ring round {round}: every leader claims the uploaded mean (CRC32 {uploaded[0]})")


# ---- asynchronous DiLoCo ----

def admit_async(site: str, round: int, *, sites: frozenset[str], applied: int, has_model: bool) -> Decision:
    """May an async update join? ``round`` is the site's own count of its updates, ``applied`` how many
    of them the coordinator applied: a lower count is a retry of an applied update (``duplicate``)."""
    if site not in sites or not has_model:
        return Decision("unknown_site", f"{site!r} cannot merge here")
    if round < applied:
        return Decision("duplicate", f"update {round} of {site!r} was applied before ({applied} of its updates are); "
                                     f"refused, never applied twice")
    return Decision("accept", f"update {round} of {site!r} is applied now")


@dataclass(frozen=True)
class AsyncWeight:
    """How an async update counts: ``staleness`` versions behind, scaled by ``weight``."""

    staleness: int
    weight: float
    reason: str


def async_weight(kind: str, version: int, based_on: int, n_sites: int) -> AsyncWeight:
    """The staleness of an update based on version ``based_on`` when the coordinator is at ``version``,
    and its weight (``training.async.staleness_weight``: geotrain.orchestrator.outer.staleness_weight)."""
    from geotrain.orchestrator.outer import staleness_weight

    staleness = max(0, version - based_on)
    weight = staleness_weight(kind, staleness, n_sites)
    return AsyncWeight(staleness, weight, f"based on version {based_on} at version {version}: "
                                          f"{staleness} behind, weight {weight:.6g} ({kind})")
