"""Property-based tests of the topology loader (issue #11, item 8): whatever arrives, the outcome is
a Topology or one TopologyError line, never another exception, a hang or unbounded memory.

Three sources of input: random YAML text (the parser's corner cases: anchors, aliases, tags, flow and
block styles), random plain data dumped to YAML, and random mutations of topologies/demo.yaml's tree
(a value replaced, a key removed or added, a ``--set`` applied). ``deadline`` turns a hang into a
failure; the process's peak memory is compared before and after. Kept to a few hundred examples
so that the whole file stays a normal unit test of a few seconds.
"""

import resource
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geotrain.config.topology import Topology, apply_override, load_topology, parse_topology
from geotrain.errors import TopologyError

REPO = Path(__file__).resolve().parents[2]
DEMO = yaml.safe_load((REPO / "topologies" / "demo.yaml").read_text())
FUZZ = settings(max_examples=200, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
_DIR = tempfile.TemporaryDirectory(prefix="geotrain-fuzz-")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def outcome(load) -> Topology | TopologyError:
    """Run one load: a Topology, or the TopologyError it raised (with one bounded line); anything else fails."""
    try:
        topo = load()
    except TopologyError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and len(msg) < 600, msg[:1000]
        return exc
    assert isinstance(topo, Topology)
    return topo


def load_text(text: str) -> Topology | TopologyError:
    path = Path(_DIR.name) / "t.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return outcome(lambda: load_topology(path))


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["10ms", "1gbit", "-1s", "1e400ms", "star", "ring", "median", "trimmed-mean", "..", "../..",
                     "/abs", "us-east", "hub", "link us-east", "worker us-east/0", "kill", ".inf", "0x10"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=12), st.integers(), st.booleans(), st.none()), inner, max_size=4)),
    max_leaves=12)
yaml_chars = st.text(alphabet="[]{}:,-&*!|>'\"#?%@` \n\tab01.e+~<=", max_size=120)


def _paths(node, prefix=()):
    """Every (path, value) in a plain tree, the root included."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


DEMO_PATHS = [p for p, _ in _paths(DEMO) if p]


def _mutate(tree, path, action, value):
    import copy

    out = copy.deepcopy(tree)
    node = out
    for part in path[:-1]:
        node = node[part]
    last = path[-1]
    if action == "replace":
        node[last] = value
    elif action == "delete":
        del node[last]
    elif isinstance(node, dict):  # "add": an unknown key beside it
        node[str(value)[:30] or "x"] = value
    else:
        node.append(value)
    return out


@FUZZ
@given(yaml_chars)
def test_random_yaml_text(text):
    before = _peak_mb()
    load_text(text)
    load_text("name: t\nsites: [{name: a, workers: 1}]\ntraining: " + text)
    assert _peak_mb() - before < 200


@FUZZ
@given(values)
def test_random_data_dumped_to_yaml(value):
    load_text(yaml.safe_dump(value))
    load_text(yaml.safe_dump({**DEMO, "training": value}))
    if isinstance(value, dict):
        outcome(lambda: parse_topology({**DEMO, **{str(k): v for k, v in value.items()}}))


@FUZZ
@given(st.sampled_from(DEMO_PATHS), st.sampled_from(["replace", "delete", "add"]), values)
def test_mutations_of_the_demo_topology(path, action, value):
    mutated = _mutate(DEMO, path, action, value)
    direct = outcome(lambda: parse_topology(mutated))
    try:
        text = yaml.safe_dump(mutated)
    except yaml.YAMLError:
        return
    through_file = load_text(text)
    # the same tree reaches the same kind of outcome through a file
    assert type(direct) is type(through_file), (direct, through_file)


@FUZZ
@given(st.sampled_from(DEMO_PATHS), st.one_of(yaml_chars, st.text(max_size=40)))
def test_random_overrides(path, value_text):
    dotted = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))
    outcome(lambda: parse_topology(apply_override(DEMO, f"{dotted}={value_text}")))
    outcome(lambda: parse_topology(apply_override(DEMO, value_text)))
