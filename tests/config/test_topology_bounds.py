"""Loading a topology is bounded (issue #11, item 7): aliases, nesting, size, numbers, paths, quoting.

Each bound is fed a file that breaks it and must give one TopologyError line naming the file and
the field; the worst ones also go through ``geotrain validate`` as a process: one line on stderr,
exit 2, under 200 MB, and no hang. How fast (the issue's "under 2 s") is measured, not asserted:
``benchmarks/hostile_topologies.py`` prints each case's time and peak memory from one run.
"""

import json
import re
import subprocess
import sys

import pytest

from geotrain.config.safeyaml import MAX_BYTES, MAX_DEPTH, MAX_NODES, load_yaml, quote
from geotrain.config.topology import apply_override, load_any, load_topology, parse_topology
from geotrain.errors import TopologyError

BASE = "name: t\nsites:\n  - {name: a, workers: 1}\n  - {name: b, workers: 1}\n"
RAW = {"name": "t", "sites": [{"name": "a", "workers": 1}, {"name": "b", "workers": 1}]}

# A "billion laughs": nine levels of ten aliases, 10^9 strings once expanded.
BOMB = BASE + 'lol0: &l0 ["lol"]\n' + "".join(
    f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10))
DEEP = BASE + "training: " + "[" * 100_000 + "]" * 100_000 + "\n"


def refusal(tmp_path, text: str, name: str = "t.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and len(msg) < 400, msg
    return msg


# ---- YAML structure ----

def test_the_alias_bomb_is_refused_at_its_first_alias(tmp_path):
    msg = refusal(tmp_path, BOMB)
    assert "lol1[0]: YAML aliases are not accepted (*l0, line 6)" in msg, msg


def test_any_alias_is_refused_and_an_anchor_alone_passes(tmp_path):
    msg = refusal(tmp_path, BASE + "links:\n  default: &fast {bandwidth: 1gbit}\n  pairs:\n"
                                   "    - {between: [a, b], <<: *fast}\n")
    assert "links.pairs[0].<<: YAML aliases are not accepted (*fast" in msg, msg
    topo_path = tmp_path / "anchor.yaml"
    topo_path.write_text(BASE + "links:\n  default: &fast {bandwidth: 1gbit}\n")
    assert load_topology(topo_path).links.default.bandwidth_mbps == 1000


def test_deep_nesting_is_one_line_naming_where(tmp_path):
    msg = refusal(tmp_path, DEEP)
    assert "training[0][0][0]" in msg and f"nested more than {MAX_DEPTH} levels deep" in msg, msg
    block = BASE + "".join("  " * i + f"k{i}:\n" for i in range(MAX_DEPTH + 5)) + "  " * (MAX_DEPTH + 5) + "x: 1\n"
    assert f"nested more than {MAX_DEPTH} levels deep, line {MAX_DEPTH + 5}" in refusal(tmp_path, block)


def test_the_depth_bound_is_exact():
    def nested(depth: int) -> str:
        return "[" * depth + "]" * depth
    assert load_yaml(nested(MAX_DEPTH), "s") is not None
    with pytest.raises(TopologyError, match=f"nested more than {MAX_DEPTH} levels deep"):
        load_yaml(nested(MAX_DEPTH + 1), "s")


def test_too_many_nodes_and_too_large_a_file(tmp_path):
    msg = refusal(tmp_path, BASE + "faults: [" + ", ".join(["0"] * (MAX_NODES + 1)) + "]\n")
    assert f"more than {MAX_NODES} YAML nodes" in msg, msg
    msg = refusal(tmp_path, BASE + "# " + "x" * MAX_BYTES + "\n")
    assert "larger than 1024 KiB" in msg, msg


def test_values_python_cannot_construct(tmp_path):
    assert "cannot construct" in refusal(tmp_path, BASE + "seed: " + "9" * 5000 + "\n")
    assert "cannot construct" in refusal(tmp_path, BASE + "name: 2001-13-45\n")
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.encode() + b"# caf\xe9\n")
    with pytest.raises(TopologyError, match="not UTF-8 text"):
        load_topology(path)


# ---- numbers ----

@pytest.mark.parametrize("line, field, words", [
    ("training: {rounds: 1.0e+18}", "training.rounds", "less than or equal to 10000000"),
    ("training: {rounds: 1e18}", "training.rounds", "valid integer"),  # YAML 1.1 reads 1e18 as a string
    ("seed: 100000000000000000000000", "seed", "less than 18446744073709551616"),
    ("seed: -1", "seed", "greater than or equal to 0"),
    ("recovery: {heartbeat_ttl_s: .inf}", "recovery.heartbeat_ttl_s", "finite number"),
    ("recovery: {heartbeat_ttl_s: 1e9}", "recovery.heartbeat_ttl_s", "less than or equal to 3600"),
    ("training: {round_timeout_s: .nan}", "training.round_timeout_s", "finite number"),
    ("training: {inner_optimizer: {lr: .nan}}", "training.inner_optimizer.lr", "finite number"),
    ("training: {inner_optimizer: {betas: [0.9, 1.0]}}", "training.inner_optimizer.betas[1]", "less than 1"),
    ("training: {inner_steps: 100000000}", "training.inner_steps", "less than or equal to 1000000"),
    ("links: {default: {bandwidth: 1gbit, latency: 1e400ms}}", "links.default.latency", "finite number"),
    ("links: {default: {bandwidth: 1gbit, latency: 2h}}", "links.default.latency", "less than or equal to 60000"),
    ("data: {max_bytes: 1000000000000000}", "data.max_bytes", "less than or equal to"),
    ("faults: [{kind: flap, target: link a, at_round: 1, duration: 5s, period: 0ms}]", "faults[0].period",
     "greater than or equal to 1"),
    ("faults: [{kind: kill, target: coordinator, at: 1e12s}]", "faults[0].at", "less than or equal to"),
    ("security: {max_update_norm_ratio: 1}", "security.max_update_norm_ratio", "greater than 1"),
    ("security: {max_update_norm_ratio: .inf}", "security.max_update_norm_ratio", "finite number"),
    ("security: {norm_history: 1}", "security.norm_history", "greater than or equal to 2"),
    ("security: {max_eval_loss_jump: 1.0}", "security.max_eval_loss_jump", "greater than 1"),
    ("training: {aggregation: trimmed-mean, trim_fraction: 0.5}", "training.trim_fraction", "less than 0.5"),
    ("training: {aggregation: mode}", "training.aggregation", "'mean', 'trimmed-mean' or 'median'"),
])
def test_numbers_out_of_range_name_the_field(tmp_path, line, field, words):
    msg = refusal(tmp_path, BASE + line + "\n")
    assert f": {field}: " in msg and words in msg, msg


def test_the_new_settings_and_their_defaults():
    t = parse_topology(RAW)
    assert (t.training.aggregation, t.training.trim_fraction) == ("mean", 0.25)
    assert (t.security.max_update_norm_ratio, t.security.norm_history, t.security.max_eval_loss_jump) == (10.0, 8, 4.0)
    off = parse_topology({**RAW, "security": {"max_update_norm_ratio": None}, "training": {"aggregation": "median"}})
    assert off.security.max_update_norm_ratio is None and off.training.aggregation == "median"
    big = parse_topology({**RAW, "seed": 2**64 - 1, "training": {"rounds": 10_000_000}})
    assert big.seed == 2**64 - 1 and big.training.rounds == 10**7


@pytest.mark.parametrize("training, words", [
    ({"aggregation": "trimmed-mean", "merge": "ring"}, "'trimmed-mean' needs `merge: star`"),
    ({"aggregation": "median", "merge": "hierarchical"}, "'median' needs `merge: star`"),
    ({"aggregation": "median", "algorithm": "async-diloco"}, "applies each update as it arrives"),
])
def test_robust_aggregation_needs_a_synchronous_star(training, words):
    with pytest.raises(TopologyError, match="training.aggregation: ") as info:
        parse_topology({**RAW, "training": training})
    assert words in str(info.value)


# ---- paths ----

@pytest.mark.parametrize("override, field", [
    ("checkpoint.path=../../etc", "checkpoint.path"),
    ("checkpoint.path=ck/../../x", "checkpoint.path"),
    ("checkpoint.path=..", "checkpoint.path"),
    ("data.paths=[corpus, ../../secret]", "data.paths[1]"),
])
def test_a_relative_path_that_climbs_out_is_refused(override, field):
    raw = apply_override({**RAW, "data": {"source": "files", "paths": ["c"]}}, override)
    with pytest.raises(TopologyError, match=re.escape(f": {field}: ")) as info:
        parse_topology(raw)
    assert "must stay inside" in str(info.value) and "absolute" in str(info.value)


@pytest.mark.parametrize("value", ["ck", "ck/a/../b", "./ck", "/abs/checkpoints", "/abs/../elsewhere"])
def test_paths_inside_or_absolute_pass(value):
    assert parse_topology({**RAW, "checkpoint": {"path": value}}).checkpoint.path == value


def test_relative_data_paths_resolve_to_absolute_ones_beside_the_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(BASE + "data: {source: files, paths: [corpus, sub/../more]}\n")
    paths = load_topology(path).data.paths
    assert paths == (str(tmp_path / "corpus"), str(tmp_path / "more"))


# ---- messages quote little ----

def test_a_huge_value_is_quoted_in_at_most_about_80_characters(tmp_path):
    big = "x" * 900_000
    for text in (BASE + f"links: {{default: {{bandwidth: 1gbit, latency: {big}}}}}\n",
                 BASE + f"training: {{algorithm: {big}}}\n",
                 BASE + f"training: {{{big}: 1}}\n",
                 BASE + f"coordinator: {{host: {big}}}\n"):
        msg = refusal(tmp_path, text)
        assert "x" * 81 not in msg, msg[:200]
    with pytest.raises(TopologyError) as info:
        parse_topology({**RAW, "name": "y" * 50_000_000})
    assert len(str(info.value)) < 300 and "y" * 81 not in str(info.value)
    with pytest.raises(TopologyError) as info:
        apply_override(RAW, "z" * 5_000_000)
    assert len(str(info.value)) < 300


def test_quote_is_bounded_for_any_value():
    assert len(quote("a" * 10**6)) < 100 and len(quote(list(range(10**6)))) < 100
    assert len(quote({str(i): [i] * 100 for i in range(1000)})) < 100
    assert "too long to show" in quote(10**5000)  # Python refuses to print an int of over 4,300 digits


# ---- JSON and --set go through the same bounds ----

def test_json_topology_is_bounded_too(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"name": "t", "sites": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(TopologyError, match="nested"):
        load_any(deep)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(RAW))
    assert load_any(ok).site_names == ["a", "b"]
    big = tmp_path / "big.json"
    big.write_text(json.dumps({**RAW, "pad": "x" * MAX_BYTES}))
    with pytest.raises(TopologyError, match="larger than"):
        load_any(big)


def test_an_override_value_that_breaks_a_bound_is_a_plain_string():
    out = apply_override(RAW, "training.rounds=" + "[" * 1000 + "]" * 1000)
    with pytest.raises(TopologyError, match="training.rounds: input should be a valid integer"):
        parse_topology(out)
    with pytest.raises(TopologyError, match="training.rounds"):
        parse_topology(apply_override(RAW, "training.rounds=[*a, *a]"))


# ---- the front door, as a process ----

_MEASURE = """
import json, resource, subprocess, sys, time
t = time.monotonic()
r = subprocess.run([sys.executable, "-m", "geotrain.cli", "validate", sys.argv[1]], capture_output=True, text=True)
wall = time.monotonic() - t
print(json.dumps({"rc": r.returncode, "stderr": r.stderr[:10000], "stderr_len": len(r.stderr), "stdout": r.stdout[:1000],
                  "wall_s": wall, "maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


@pytest.mark.parametrize("case, text, words", [
    ("alias-bomb", BOMB, "YAML aliases are not accepted"),
    ("deep-nesting", DEEP, f"nested more than {MAX_DEPTH} levels deep"),
    ("huge-rounds", BASE + "training: {rounds: 1.0e+18}\n", "training.rounds"),
    ("huge-seed", BASE + "seed: 100000000000000000000000\n", "seed"),
    ("infinite-ttl", BASE + "recovery: {heartbeat_ttl_s: .inf}\n", "recovery.heartbeat_ttl_s"),
    ("escaping-path", BASE + "checkpoint: {path: ../../outside}\n", "checkpoint.path"),
    ("too-large", BASE + "# " + "x" * MAX_BYTES + "\n", "larger than 1024 KiB"),
    ("huge-value", BASE + "name: " + "n" * 900_000 + "\n", "name: expected a name"),
])
def test_validate_refuses_in_one_line_exit_2_and_small(tmp_path, case, text, words):
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    # A fresh wrapper process, so that RUSAGE_CHILDREN holds this one child's peak and nothing else's.
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, timeout=60)
    m = json.loads(r.stdout)
    lines = m["stderr"].strip().splitlines()
    assert m["rc"] == 2 and len(lines) == 1 and m["stderr_len"] < 400, m
    assert lines[0].startswith(f"geotrain validate: {path}: ") and words in lines[0], m
    assert "Traceback" not in m["stderr"] and not m["stdout"], m
    assert m["wall_s"] < 30.0, m  # a hang guard only: the time itself is the benchmark's (no timing targets in tests)
    assert m["maxrss_mb"] < 200, m


def test_a_directory_or_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(TopologyError, match="cannot read the topology file: Is a directory"):
        load_topology(tmp_path)
    with pytest.raises(TopologyError, match="no such topology file"):
        load_topology(tmp_path / "absent.yaml")


@pytest.mark.parametrize("loader", ["CSafeLoader", "SafeLoader"])
def test_both_parsers_give_the_same_refusals(monkeypatch, loader):
    """libyaml when PyYAML has it, PyYAML's pure-Python parser otherwise: the same bounds either way."""
    import yaml

    from geotrain.config import safeyaml

    if not hasattr(yaml, loader):
        pytest.skip(f"this PyYAML has no {loader}")
    monkeypatch.setattr(safeyaml, "_LOADER", getattr(yaml, loader))
    with pytest.raises(TopologyError, match=r"lol1\[0\]: YAML aliases are not accepted"):
        load_yaml(BOMB, "s")
    with pytest.raises(TopologyError, match=rf"training\[0\]\[0\].*nested more than {MAX_DEPTH} levels deep"):
        load_yaml(DEEP, "s")
    assert load_yaml(BASE, "s")["sites"][1] == {"name": "b", "workers": 1}


def test_a_key_that_is_not_a_string_is_named_as_a_key(tmp_path):
    msg = refusal(tmp_path, BASE + "training: {1: 2}\n")
    assert ": training.1: keys should be strings" in msg, msg
    msg = refusal(tmp_path, BASE + "training: {'a[0]': 2}\n")  # a key that looks like a label of pydantic's
    assert ": training.a[0]: unknown key" in msg, msg


def test_topk_needs_the_star_and_error_feedback():
    from geotrain.config.topology import parse_topology
    from geotrain.errors import TopologyError

    base = {"name": "t", "sites": [{"name": "a", "workers": 1}, {"name": "b", "workers": 1}]}
    ok = parse_topology({**base, "training": {"compression": {"codec": "topk", "density": 0.01, "bits": 2}}})
    assert ok.training.compression.codec == "topk"
    with pytest.raises(TopologyError, match="training.compression.codec: `topk` .* use `merge: star`"):
        parse_topology({**base, "training": {"merge": "ring", "compression": {"codec": "topk"}}})
    with pytest.raises(TopologyError, match="training.compression.error_feedback"):
        parse_topology({**base, "training": {"compression": {"codec": "topk", "error_feedback": False}}})
    with pytest.raises(TopologyError, match="bits"):
        parse_topology({**base, "training": {"compression": {"codec": "topk", "bits": 3}}})


def test_quorum_is_checked_against_the_topology():
    from geotrain.config.topology import parse_topology
    from geotrain.errors import TopologyError

    base = {"name": "t", "sites": [{"name": "a", "workers": 1}, {"name": "b", "workers": 1}]}
    ok = parse_topology({**base, "training": {"quorum": {"min_sites": 1, "grace_s": 2}}})
    assert ok.training.quorum.min_sites == 1 and ok.training.quorum.grace_s == 2
    with pytest.raises(TopologyError, match="training.quorum.min_sites: 3 is more than the 2 sites"):
        parse_topology({**base, "training": {"quorum": {"min_sites": 3}}})
    with pytest.raises(TopologyError, match="training.quorum: .*async-diloco"):
        parse_topology({**base, "training": {"algorithm": "async-diloco", "quorum": {"min_sites": 1}}})
    with pytest.raises(TopologyError, match="training.quorum: ring merges"):
        parse_topology({**base, "training": {"merge": "ring", "quorum": {"min_sites": 1}}})
