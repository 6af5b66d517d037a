"""The coordinator's round decisions, as transcripts: no sockets, no sleeps."""

from geotrain.orchestrator.rounds import RoundState, admit, next_round, record_arrival, round_ready

SITES = frozenset({"us", "eu", "asia"})


def test_round_commits_when_every_site_reported():
    s = RoundState(expected=SITES)
    for t, site in enumerate(["eu", "us"]):
        assert admit(s, site, 0).action == "accept"
        s = record_arrival(s, site, now=float(t))
        d = round_ready(float(t), s, timeout_s=10)
        assert d.action == "wait" and "asia" in d.reason
    s = record_arrival(s, "asia", now=2.0)
    d = round_ready(2.0, s, timeout_s=10)
    assert d.action == "commit", d.reason
    s = next_round(s)
    assert s.round == 1 and s.version == 1 and not s.arrived and s.started_at is None


def test_stale_update_is_refused_never_applied_twice():
    s = next_round(next_round(RoundState(expected=SITES)))
    d = admit(s, "us", 1)
    assert d.action == "stale" and not d and "already committed" in d.reason


def test_future_duplicate_and_unknown_sites_are_refused():
    s = record_arrival(RoundState(expected=SITES), "us", 0.0)
    assert admit(s, "us", 0).action == "duplicate"
    assert admit(s, "eu", 3).action == "future"
    d = admit(s, "mars", 0)
    assert d.action == "unknown_site" and "mars" in d.reason


def test_round_times_out_from_first_arrival_and_names_missing_sites():
    s = record_arrival(RoundState(expected=SITES), "us", now=100.0)
    assert round_ready(104.9, s, timeout_s=5).action == "wait"
    d = round_ready(105.1, s, timeout_s=5)
    assert d.action == "timeout" and "asia" in d.reason and "eu" in d.reason and "us" not in d.reason.split("from")[1]


def test_no_timeout_before_anyone_arrives():
    assert round_ready(1e9, RoundState(expected=SITES), timeout_s=1).action == "wait"


def test_deadline_commits_with_quorum_and_drops_the_silent_site():
    s = RoundState(expected=SITES)
    s = record_arrival(record_arrival(s, "us", 0.0), "eu", 1.0)
    assert round_ready(9.0, s, timeout_s=10, min_sites=2).action == "wait"
    d = round_ready(10.5, s, timeout_s=10, min_sites=2)
    assert d.action == "commit_partial" and "dropping asia" in d.reason
    s2 = next_round(s, dropped=frozenset({"asia"}))
    assert s2.expected == {"us", "eu"} and s2.round == 1


def test_deadline_without_quorum_times_out():
    s = record_arrival(RoundState(expected=SITES), "us", 0.0)
    d = round_ready(11.0, s, timeout_s=10, min_sites=2)
    assert d.action == "timeout" and "fewer than the 2 required" in d.reason


def test_rejoin_waits_for_the_next_round_when_one_is_in_flight():
    from geotrain.orchestrator.rounds import join

    s = RoundState(round=4, expected=frozenset({"us", "eu"}))
    s = record_arrival(s, "us", 0.0)
    s, start_version, d = join(s, "asia")
    assert d.action == "join_next" and start_version == 5 and "asia" not in s.expected
    assert admit(s, "asia", 4).action == "unknown_site"      # it may not sneak into round 4
    s = next_round(record_arrival(s, "eu", 1.0))
    assert "asia" in s.expected and admit(s, "asia", 5).action == "accept"


def test_join_before_any_arrival_joins_now_and_members_stay():
    from geotrain.orchestrator.rounds import join

    s = RoundState(round=2, expected=frozenset({"us"}))
    s, v, d = join(s, "eu")
    assert d.action == "join_now" and v == 2 and "eu" in s.expected
    s2, v, d = join(s, "eu")
    assert d.action == "member" and s2 == s


def test_ring_rebuilt_after_a_star_round_with_every_site():
    from geotrain.orchestrator.rounds import ring_reform

    d = ring_reform(3, sites=SITES, arrived=SITES, next_expected=SITES, failures=1, abandoned_at=3)
    assert d.action == "ring" and "round 4" in d.reason
    d = ring_reform(0, sites=SITES, arrived=SITES, next_expected=SITES, failures=0, abandoned_at=-1)
    assert d.action == "ring"  # a resumed run (or a replaced coordinator): rings from the next round


def test_ring_not_rebuilt_without_every_site_or_while_membership_changes():
    from geotrain.orchestrator.rounds import ring_reform

    d = ring_reform(3, sites=SITES, arrived=SITES - {"eu"}, next_expected=SITES, failures=1, abandoned_at=3)
    assert d.action == "star" and "without eu" in d.reason
    d = ring_reform(3, sites=SITES, arrived=SITES, next_expected=SITES - {"asia"}, failures=1, abandoned_at=3)
    assert d.action == "star" and "asia" in d.reason


def test_ring_rebuilding_backs_off_after_failed_attempts():
    from geotrain.orchestrator.rounds import RING_BACKOFF_MAX, ring_reform

    def next_attempt(failures, abandoned_at):
        r = abandoned_at
        while ring_reform(r, sites=SITES, arrived=SITES, next_expected=SITES, failures=failures,
                          abandoned_at=abandoned_at).action != "ring":
            r += 1
        return r + 1

    assert [next_attempt(f, 10) - 10 for f in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert next_attempt(50, 10) - 10 == RING_BACKOFF_MAX
    d = ring_reform(10, sites=SITES, arrived=SITES, next_expected=SITES, failures=3, abandoned_at=10)
    assert d.action == "star" and "next attempt at round 14" in d.reason
