"""Topology loading: good files validate, bad files give one clear error naming file and field."""

import subprocess
import sys
from pathlib import Path

import pytest

from geotrain.errors import TopologyError
from geotrain.config.topology import apply_override, load_topology, parse_topology

REPO = Path(__file__).resolve().parents[2]
BAD = REPO / "tests" / "data" / "bad"

# file -> (YAML path the message must name, words it must contain)
BAD_CASES = {
    "wrong_type.yaml": ("sites[0].workers", "valid integer"),
    "unknown_key.yaml": ("training.inner_stpes", "did you mean 'inner_steps'"),
    "unknown_site_link.yaml": ("links.pairs[0].between[1]", "unknown place 'mars'"),
    "negative_bandwidth.yaml": ("links.default.bandwidth", "must be positive"),
    "zero_workers.yaml": ("sites[0].workers", "greater than or equal to 1"),
    "missing_field.yaml": ("sites[0].workers", "required field is missing"),
    "missing_sites.yaml": ("sites", "required field is missing"),
    "bad_latency.yaml": ("links.default.latency", "expected a duration"),
    "bad_algorithm.yaml": ("training.algorithm", "'gossip'"),
    "duplicate_site.yaml": ("sites[1].name", "already defined at sites[0]"),
    "not_yaml.yaml": ("line", "not valid YAML"),
    "not_mapping.yaml": ("top level", "expected a mapping"),
    "async_overlap_too_long.yaml": ("training.async.overlap_steps", "must be less than training.inner_steps (10)"),
    "ring_with_async.yaml": ("training.merge", "merges work with algorithm `diloco` (got 'async-diloco')"),
    "aggregation_with_ring.yaml": ("training.aggregation", "'median' needs `merge: star`"),
}


def test_every_bad_file_has_a_case():
    assert sorted(p.name for p in BAD.glob("*.yaml")) == sorted(BAD_CASES)


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_topology_error_names_file_and_field(name):
    path, words = BAD_CASES[name]
    with pytest.raises(TopologyError) as info:
        load_topology(BAD / name)
    msg = str(info.value)
    assert msg.startswith(str(BAD / name) + ":"), msg
    assert path in msg and words in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("name", ["wrong_type.yaml", "unknown_site_link.yaml", "not_yaml.yaml"])
@pytest.mark.parametrize("command", ["validate", "launch"])
def test_cli_exits_2_with_one_line_and_no_traceback(name, command, tmp_path):
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", command, str(BAD / name), *(["--run-dir", str(tmp_path / "r")] if command == "launch" else [])],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(BAD / name) in lines[0] and BAD_CASES[name][0] in lines[0], r.stderr


def test_missing_file_exits_2():
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "validate", "/nonexistent/t.yaml"], capture_output=True, text=True)
    assert r.returncode == 2 and "no such topology file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("path", sorted((REPO / "topologies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_topologies_validate(path):
    topo = load_topology(path)
    assert topo.sites and topo.digest()


def test_units_and_defaults():
    t = parse_topology({"name": "x", "sites": [{"name": "a", "workers": 1}],
                        "links": {"default": {"bandwidth": "1gbit", "latency": "1.5s", "jitter": "250us"}}})
    assert t.links.default.bandwidth_mbps == 1000 and t.links.default.latency_ms == 1500 and t.links.default.jitter_ms == 0.25
    oo = t.training.outer_optimizer
    assert (oo.name, oo.lr, oo.momentum, oo.nesterov) == ("sgd", 0.7, 0.9, True)  # the DiLoCo paper's defaults
    assert t.link("a", "hub") == t.links.default and t.link("a", "a") is None


def test_pair_links_override_the_default_in_both_orders():
    t = parse_topology({"name": "x", "sites": [{"name": "a", "workers": 1}, {"name": "b", "workers": 1}],
                        "links": {"pairs": [{"between": ["b", "hub"], "bandwidth": 10, "latency": "80ms"}]}})
    assert t.link("hub", "b").bandwidth_mbps == 10 and t.link("b", "hub").latency_ms == 80
    assert t.link("a", "hub") == t.links.default


def test_coordinator_inside_a_site_has_no_wan_link_to_it():
    t = parse_topology({"name": "x", "sites": [{"name": "a", "workers": 1}, {"name": "b", "workers": 1}],
                        "coordinator": {"at": "a"}})
    assert t.places() == ["a", "b"] and t.link("a", "a") is None and t.link("b", "a") is not None


def test_overrides():
    raw = {"name": "x", "sites": [{"name": "a", "workers": 1}]}
    out = apply_override(raw, "sites[0].workers=4")
    out = apply_override(out, "links.default.bandwidth=100mbit")
    out = apply_override(out, "training.inner_steps=50")
    t = parse_topology(out)
    assert t.sites[0].workers == 4 and t.links.default.bandwidth_mbps == 100 and t.training.inner_steps == 50
    assert raw["sites"][0]["workers"] == 1  # the original is untouched
    with pytest.raises(TopologyError, match="sites\\[3\\] does not exist"):
        apply_override(raw, "sites[3].workers=2")
    with pytest.raises(TopologyError, match="expected path=value"):
        apply_override(raw, "training.inner_steps")


def test_override_errors_name_the_field(tmp_path):
    with pytest.raises(TopologyError, match="training.rounds: input should be greater than or equal to 1"):
        load_topology(REPO / "topologies" / "demo.yaml", ["training.rounds=0"])


def test_digest_changes_with_content():
    a = load_topology(REPO / "topologies" / "demo.yaml")
    b = load_topology(REPO / "topologies" / "demo.yaml", ["training.rounds=9"])
    assert a.digest() != b.digest() and a.digest() == load_topology(REPO / "topologies" / "demo.yaml").digest()
