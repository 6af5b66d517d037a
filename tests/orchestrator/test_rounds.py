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
