"""Reading YAML nobody vouches for: bounded in size, nesting and node count, with no aliases.

A topology file may come from anywhere (a pull request, a shared folder, a ``--set`` typed by
someone else), so it is bounded before anything is built from it (issue #11, item 7):

- **size**: at most :data:`MAX_BYTES` (1 MiB; the shipped topologies are under 2 KB). The file is
  read with that limit, never whole.
- **aliases** (``*name``) are refused, every one. A cap on alias *events* would not bound anything:
  a "billion laughs" document needs only ten aliases per level to expand 10^9-fold. Bounding the
  expanded size would work, but aliases buy a topology little (it is short; ``--set`` covers
  variants) and cost a real surprise: an alias makes two places of the tree one shared object, so
  a ``--set`` on one silently changes the other. Anchors alone (``&name``) are harmless and pass.
- **nesting** at most :data:`MAX_DEPTH` levels and at most :data:`MAX_NODES` nodes, checked on the
  parser's events before any node is composed: 100,000 levels give one error, not a RecursionError.

The check walks libyaml's events when PyYAML has it (1 MiB in about 0.3 s), else PyYAML's own
parser's; only a document that passes is composed and constructed, by the safe loader (plain
data, never Python objects). Every refusal is one :class:`~geotrain.errors.TopologyError` line
naming the source, the YAML path and the line.

:func:`quote` and :func:`fmt_loc` keep the messages bounded too: a value is quoted in at most
about :data:`QUOTE_CHARS` characters, whatever its size.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

from geotrain.errors import TopologyError

MAX_BYTES = 1 << 20
"""Largest topology file (or ``--set`` value) read: 1 MiB."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and sequences (a topology needs 4)."""
MAX_NODES = 50_000
"""Most nodes (scalars, mappings, sequences) in one document (a 256-site topology needs about 2,000)."""
QUOTE_CHARS = 80
"""Most characters of a value an error message quotes."""
_REWALK_CHARS = 64 * 1024

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_REPR = reprlib.Repr()
_REPR.maxstring = QUOTE_CHARS
_REPR.maxother = QUOTE_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def quote(value: Any) -> str:
    """``repr(value)`` in at most about QUOTE_CHARS characters, computed in bounded time."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int too long to print (Python refuses over 4,300 digits)
        text = f"<{type(value).__name__} too long to show>"
    return text if len(text) <= QUOTE_CHARS + 8 else text[:QUOTE_CHARS] + "...'"


def fmt_loc(loc) -> str:
    """A YAML path like ``links.pairs[1].latency`` from its parts; each key clipped and escaped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if isinstance(part, str) and part.isprintable() and len(part) <= 40 else quote(part)
            out += ("." if out else "") + key
    return out or "(top level)"


def read_bounded(path: Path, what: str = "topology file") -> str:
    """The text of ``path``, refused if it is larger than MAX_BYTES or not UTF-8."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise TopologyError(f"{path}: no such {what}") from None
    except OSError as exc:  # a directory, no permission, a device that fails
        raise TopologyError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise TopologyError(f"{path}: the {what} is larger than {MAX_BYTES // 1024} KiB; a topology is a few KB of YAML")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TopologyError(f"{path}: the {what} is not UTF-8 text (byte {exc.start})") from None


def load_yaml(text: str, source: str) -> Any:
    """Parse one YAML document within the bounds above; any problem is one TopologyError line."""
    if len(text) > MAX_BYTES:
        raise TopologyError(f"{source}: more than {MAX_BYTES // 1024} KiB of YAML; a topology is a few KB")
    try:
        _check_events(text, source)
        return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader (CSafeLoader or SafeLoader)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None and mark.index <= _REWALK_CHARS:
            _rewalk(text[:mark.index], source)  # raises our own refusal if one lies before the error
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TopologyError(f"{source}: not valid YAML{where}: {_one_line(problem)}") from None
    except RecursionError:  # not expected within MAX_DEPTH; kept so that no traceback can escape
        raise TopologyError(f"{source}: nested too deeply to read") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # The safe constructor turns scalars into ints, dates, bytes; a few malformed ones fail there
        # (an integer of over 4,300 digits, a date like 2001-13-45) with Python's own error.
        raise TopologyError(f"{source}: a value YAML cannot construct: {_one_line(str(exc))}") from None


def check_depth(value: Any, source: str) -> None:
    """Refuse plain data (from JSON, say) nested deeper than MAX_DEPTH, walking without recursion."""
    stack = [(value, 0)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth >= MAX_DEPTH:
                raise TopologyError(f"{source}: nested more than {MAX_DEPTH} levels deep")
            children = node.values() if isinstance(node, dict) else node
            seen += len(children)
            if seen > MAX_NODES:
                raise TopologyError(f"{source}: more than {MAX_NODES} values; a topology needs a few hundred")
            stack.extend((c, depth + 1) for c in children)


def _rewalk(text: str, source: str) -> None:
    """A scanner reads ahead (up to 1,024 characters for a possible key) and has its own nesting limit
    (1,000, in libyaml and in PyYAML), so a flow-style nesting bomb fails in the scanner before the
    walk sees depth 65. Walking only the text before that error, the parser's events reach depth 65
    before the (now earlier) end: our refusal, which names the YAML path. Bounded by _REWALK_CHARS;
    if the walk finds nothing, the scanner's error stands."""
    try:
        _check_events(text, source, loader=yaml.SafeLoader)
    except yaml.YAMLError:
        pass


def _check_events(text: str, source: str, loader=_LOADER) -> None:
    """Walk the parser's events: refuse an alias, nesting past MAX_DEPTH, more than MAX_NODES nodes.

    The walk keeps the YAML path of the node being read (a stack of mapping keys and sequence
    indices), so each refusal names where it is.
    """
    # Each frame: [kind, index_or_key, expecting_key]: "seq" (its next index), "map" (its current key,
    # and whether the next node is a key), or "key" (a marker: the collection above it is a mapping's key).
    frames: list[list] = []
    nodes = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            frames.pop()
            _done(frames)
            continue
        if not isinstance(event, (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent, yaml.AliasEvent)):
            continue
        nodes += 1
        is_key = bool(frames) and frames[-1][0] == "map" and frames[-1][2]
        if isinstance(event, yaml.AliasEvent):
            raise TopologyError(f"{source}: {_where(frames, is_key)}: YAML aliases are not accepted "
                                f"(*{_clip(event.anchor)}{_line(event)}); write the value out")
        if nodes > MAX_NODES:
            raise TopologyError(f"{source}: more than {MAX_NODES} YAML nodes{_line(event)}; a topology needs a few hundred")
        if isinstance(event, yaml.ScalarEvent):
            if is_key:
                frames[-1][1] = event.value
                frames[-1][2] = False
            else:
                _done(frames)
            continue
        if len(frames) >= MAX_DEPTH:
            raise TopologyError(f"{source}: {_clip(_where(frames, is_key))}: nested more than {MAX_DEPTH} levels deep{_line(event)}")
        if is_key:  # a mapping or sequence used as a key: no name to show
            frames[-1][1] = "?"
            frames[-1][2] = False
            frames.append(["key", None, False])  # its end must not advance the parent as a value
        frames.append(["seq", 0, False] if isinstance(event, yaml.SequenceStartEvent) else ["map", None, True])
    # (no frames remain: the parser checked that every collection was closed)


def _done(frames: list[list]) -> None:
    """A node finished: the enclosing sequence moves to its next index, a mapping to its next key."""
    if frames and frames[-1][0] == "key":  # a collection used as a key ended; its mapping now reads the value
        frames.pop()
        return
    if not frames:
        return
    top = frames[-1]
    if top[0] == "seq":
        top[1] += 1
    else:
        top[2] = True


def _where(frames: list[list], is_key: bool) -> str:
    loc: list = []
    for kind, at, expecting_key in frames:
        if kind == "seq":
            loc.append(at)
        elif kind == "map" and at is not None and not expecting_key:
            loc.append(at)
    return fmt_loc(loc) + (" (a key)" if is_key else "")


def _line(event) -> str:
    mark = event.start_mark
    return f", line {mark.line + 1}" if mark is not None else ""


def _clip(text: str) -> str:
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


def _one_line(text: str) -> str:
    return _clip(" ".join(str(text).split()))
