"""The coordinator's decisions, as pure functions of (now, state, config).

Nothing here touches gRPC, etcd or a clock: the servicer feeds events in (a site's update
arrived, time passed) and acts on the returned decision. Each decision carries a reason a
person can read, and tests assert on decisions and reasons without sockets or sleeps.

The round protocol (synchronous DiLoCo): round r collects one update from every expected site,
each based on global version r. When all have arrived the round is committed: version r+1 is
the outer step applied to the mean update, and round r+1 starts.
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

    @property
    def version(self) -> int:
        return self.round


@dataclass(frozen=True)
class Decision:
    action: str
    """accept | stale | future | unknown_site | duplicate | commit | wait | timeout"""
    reason: str

    def __bool__(self) -> bool:
        return self.action in ("accept", "commit")


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


def round_ready(now: float, state: RoundState, timeout_s: float) -> Decision:
    """Is the round complete, still waiting, or past its deadline?"""
    missing = sorted(state.expected - set(state.arrived))
    if not missing:
        return Decision("commit", f"all {len(state.expected)} sites reported for round {state.round}")
    if state.started_at is not None and now - state.started_at > timeout_s:
        return Decision("timeout", f"round {state.round}: no update from {', '.join(missing)} within "
                                   f"{timeout_s:.1f}s of the first arrival")
    return Decision("wait", f"round {state.round}: waiting for {', '.join(missing)}")


def next_round(state: RoundState) -> RoundState:
    """The state after committing the current round."""
    return RoundState(round=state.round + 1, expected=state.expected)
