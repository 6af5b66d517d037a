"""The grid of a sweep (geotrain.analysis.sweep): ``--grid PATH=V1,V2,...`` entries, their points, validation.

The points are the cartesian product of the entries, in the order given (the last entry varies
fastest, like :func:`itertools.product`); each point has a run-directory slug made of short keys
and values. :func:`validate` loads every point's topology (the file, the ``--set`` overrides,
then the point's values) before anything runs; a bad value is one :class:`SweepError` naming its
``--grid`` entry.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from geotrain.errors import GeotrainError, TopologyError


class SweepError(GeotrainError):
    """A sweep's input is wrong (grid, topology, output directory): exit code 2."""

    exit_code = 2


@dataclass(frozen=True)
class GridEntry:
    path: str                 # e.g. "links.default.bandwidth"
    values: tuple[str, ...]   # as written, e.g. ("100mbit", "1gbit"); parsed as YAML by the override
    text: str                 # the --grid argument as given, for error messages

    def override(self, value: str) -> str:
        return f"{self.path}={value}"


@dataclass(frozen=True)
class Point:
    index: int                               # 1-based, in expansion order
    values: tuple[tuple[str, str], ...]      # ((path, value), ...) in grid order
    slug: str                                # run directory name under OUT/runs/

    @property
    def overrides(self) -> list[str]:
        return [f"{p}={v}" for p, v in self.values]

    @property
    def label(self) -> str:
        return " ".join(self.overrides)


_PATH_PART = re.compile(r"[A-Za-z_][\w-]*(\[-?\d+\])*|\[-?\d+\](\[-?\d+\])*")


def _split_values(text: str) -> list[str]:
    """Split on commas that are not inside [...], {...} or quotes (so YAML lists stay whole)."""
    out, cur, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


def parse_grid(text: str) -> GridEntry:
    """Parse one ``--grid PATH=V1,V2,...`` argument. Raises SweepError naming the argument."""
    where = f"--grid {text!r}"
    if "=" not in text:
        raise SweepError(f"{where}: expected PATH=V1,V2,..., e.g. --grid training.inner_steps=10,50,100")
    path, _, rest = text.partition("=")
    path = path.strip()
    if not path:
        raise SweepError(f"{where}: the path before '=' is empty (e.g. training.inner_steps=10,50)")
    if not all(_PATH_PART.fullmatch(part) for part in path.split(".")):
        raise SweepError(f"{where}: cannot read the path {path!r} (expected dotted keys with optional [index], "
                         f"e.g. links.default.bandwidth or sites[0].workers)")
    if not rest.strip():
        raise SweepError(f"{where}: no values after '=' (give them comma-separated, e.g. {path}=10,50)")
    values = [v.strip() for v in _split_values(rest)]
    if any(not v for v in values):
        raise SweepError(f"{where}: an empty value (check for a doubled or trailing comma)")
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise SweepError(f"{where}: the value {v!r} is given twice")
        seen.add(v)
    return GridEntry(path=path, values=tuple(values), text=text)


def parse_grids(texts: Sequence[str], sets: Sequence[str] = ()) -> list[GridEntry]:
    entries = [parse_grid(t) for t in texts]
    if not entries:
        raise SweepError("give at least one --grid PATH=V1,V2,...")
    seen: dict[str, str] = {}
    for e in entries:
        if e.path in seen:
            raise SweepError(f"--grid {e.text!r}: the path {e.path} is already swept by --grid {seen[e.path]!r}; "
                             f"give all its values in one entry")
        seen[e.path] = e.text
    for s in sets:
        path = s.partition("=")[0].strip()
        if path in seen:
            raise SweepError(f"--set {s!r}: {path} is also swept by --grid {seen[path]!r}; drop one of them")
    return entries


def _slug_value(value: str) -> str:
    v = re.sub(r"[^A-Za-z0-9._+-]+", "-", value).strip("-.")
    return v or "x"


def _short_keys(paths: list[str]) -> list[str]:
    """The shortest unique dotted suffix of every path: inner_steps, bandwidth, pairs[0].bandwidth."""
    parts = [p.split(".") for p in paths]
    n = {i: 1 for i in range(len(paths))}
    while True:
        keys = [".".join(parts[i][-n[i]:]) for i in range(len(paths))]
        clashes = [i for i, k in enumerate(keys) if keys.count(k) > 1 and n[i] < len(parts[i])]
        if not clashes:
            return [re.sub(r"[^A-Za-z0-9._+\[\]-]+", "-", k) for k in keys]
        for i in clashes:
            n[i] += 1


def expand(grid: Sequence[GridEntry]) -> list[Point]:
    """The cartesian product of the grid, last entry fastest, each point with a unique slug."""
    keys = _short_keys([e.path for e in grid])
    points, used = [], set()
    for i, combo in enumerate(itertools.product(*[e.values for e in grid]), 1):
        slug = ",".join(f"{k}={_slug_value(v)}" for k, v in zip(keys, combo))
        if len(slug) > 100:
            slug = slug[:100].rstrip(",=")
        base, n = slug, 1
        while slug in used:
            n += 1
            slug = f"{base}-{n}"
        used.add(slug)
        points.append(Point(index=i, values=tuple((e.path, v) for e, v in zip(grid, combo)), slug=slug))
    return points


# ---------------------------------------------------------------------------------------------
# Validation (before anything runs)
# ---------------------------------------------------------------------------------------------

def _strip_set_prefix(msg: str, item: str) -> str:
    prefix = f"--set {item!r}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def validate(topology: Path, sets: Sequence[str], grid: Sequence[GridEntry], points: Sequence[Point]):
    """Load every point's topology. Returns (base topology, [point topology, ...]); raises SweepError."""
    from geotrain.config.topology import load_topology

    try:
        base = load_topology(topology, list(sets))
    except TopologyError as exc:
        raise SweepError(str(exc)) from None
    # Every grid value on its own first, so a bad value is blamed on its entry.
    for entry in grid:
        digests: dict[str, str] = {}
        for value in entry.values:
            item = entry.override(value)
            try:
                topo = load_topology(topology, [*sets, item])
            except TopologyError as exc:
                raise SweepError(f"--grid {entry.text!r} (value {value!r}): "
                                 f"{_strip_set_prefix(str(exc), item)}") from None
            d = topo.digest()
            if d in digests:
                raise SweepError(f"--grid {entry.text!r}: the values {digests[d]!r} and {value!r} give the same "
                                 f"topology; give each setting once")
            digests[d] = value
    topos = []
    seen: dict[str, Point] = {}
    for p in points:
        try:
            topo = load_topology(topology, [*sets, *p.overrides])
        except TopologyError as exc:
            msg = str(exc)
            for item in p.overrides:
                msg = _strip_set_prefix(msg, item)
            raise SweepError(f"point {p.index} of the grid ({p.label}): {msg}") from None
        d = topo.digest()
        if d in seen:
            raise SweepError(f"points {seen[d].index} ({seen[d].label}) and {p.index} ({p.label}) give the same "
                             f"topology")
        seen[d] = p
        topos.append(topo)
    return base, topos
