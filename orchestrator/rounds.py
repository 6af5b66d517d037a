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
"""

from __future__ import annotations

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

    @property
    def version(self) -> int:
        return self.round


@dataclass(frozen=True)
class Decision:
    action: str
    """accept | stale | future | unknown_site | duplicate | commit | commit_partial | wait | timeout |
    member | join_now | join_next"""
    reason: str

    def __bool__(self) -> bool:
        return self.action in ("accept", "commit", "commit_partial")


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


def record_arrival(state: RoundState, site: str, now: float) -> RoundState:
    arrived = dict(state.arrived)
    arrived[site] = now
    return replace(state, arrived=arrived, started_at=state.started_at if state.started_at is not None else now)


def round_ready(now: float, state: RoundState, timeout_s: float, min_sites: int | None = None) -> Decision:
    """Is the round complete, still waiting, or past its deadline (and then: enough sites or not)?"""
    missing = sorted(state.expected - set(state.arrived))
    if not missing and state.arrived:
        return Decision("commit", f"all {len(state.expected)} sites reported for round {state.round}")
    if state.started_at is not None and now - state.started_at > timeout_s:
        need = len(state.expected) if min_sites is None else min_sites
        if len(state.arrived) >= need:
            return Decision("commit_partial", f"round {state.round}: deadline of {timeout_s:.1f}s passed; committing with "
                                              f"{', '.join(sorted(state.arrived))}; dropping {', '.join(missing)}")
        return Decision("timeout", f"round {state.round}: no update from {', '.join(missing)} within "
                                   f"{timeout_s:.1f}s of the first arrival, and {len(state.arrived)} sites "
                                   f"are fewer than the {need} required")
    return Decision("wait", f"round {state.round}: waiting for {', '.join(missing)}")


def join(state: RoundState, site: str) -> tuple[RoundState, int, Decision]:
    """A site (re)joins. Returns the new state, the global version it must start from, and why."""
    if site in state.expected:
        return state, state.round, Decision("member", f"{site!r} is a member of round {state.round}")
    if not state.arrived:
        return replace(state, expected=state.expected | {site}), state.round, \
            Decision("join_now", f"{site!r} joins round {state.round}, which has no update yet")
    return replace(state, joining=state.joining | {site}), state.round + 1, \
        Decision("join_next", f"{site!r} joins at round {state.round + 1}; round {state.round} is already being collected")


def next_round(state: RoundState, dropped: frozenset[str] = frozenset()) -> RoundState:
    """The state after committing the current round: silent sites dropped, joiners added."""
    return RoundState(round=state.round + 1, expected=(state.expected - dropped) | state.joining)


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
