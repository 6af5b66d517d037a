"""Scenario transcripts of the coordinator's round decisions (geotrain.orchestrator.rounds).

Like etcd-io/raft's ``testdata/*.txt`` (cockroachdb/datadriven): each file in ``testdata/`` is a
list of blocks; a block is one or more command lines, a ``----`` line, and the output those
commands must print, up to the next blank line. ``#`` lines are comments::

    # a site that misses the deadline is dropped
    config sites=eu,us timeout=10s min_sites=1
    arrive eu round=0 at=0s
    ----
    state: round=0 expected=eu,us
    accept: update from 'eu' accepted for round 0
    wait: round 0: waiting for us

The interpreter (:class:`Coordinator`) plays the servicer's part (orchestrator/server.py) with a
simulated clock: it feeds events to the pure decisions (``admit`` + ``record_arrival``,
``round_ready``, ``join``, ``next_round``, ``ring_reform``) and acts on them as the servicer
does (commit -> next round without the silent sites; timeout without quorum -> the round
reopens; a ring round that breaks -> merged through the star). Each command prints the
decisions it got as ``action: reason`` and, where the state changed, ``state: ...``.

Commands:

``config sites=A,B [members=A,B] [round=N] timeout=D [min_sites=N] [quorum=K grace=D] [rounds=R] [rings]``
    a fresh coordinator; ``sites`` is the topology, ``members`` who round N waits for (default:
    every site); ``rounds``: the run plans R rounds (a join after the last is ``run_done``); ``rings``: a ring run (star rounds are followed by ``ring_reform``).
``join SITE``
    the site's leader calls Join (now: a round begun longer ago than the join window is joined at the next).
``arrive SITE round=N [at=T]``
    its update for round N arrives (at absolute time T, default: now); if admitted, the round is
    checked at once, as the servicer does after every arrival.
``refuse SITE round=N [why=W]``
    its update for round N arrives with values that cannot count (validate_update refused it, for
    W, default non_finite): ``refuse_update`` says whether the site fails the round; if it does,
    the round is checked at once (the others may all be in).
``lost SITE [why=W]``
    the site was declared dead (its lease lost, its supervisor saw it exit; W is how, default
    "killed"): ``lose`` says what that means for the round; the round is checked at once (the
    others may all be in).
``tick D``
    D passes; the round is checked against its deadline.
``abandon``
    the ring of the round being collected broke (a leader sent its update to the star); a ring
    round that is not complete by its deadline is abandoned the same way.

Set ``GEOTRAIN_REWRITE=1`` to rewrite the expected output of every file from what the commands
print (raft's ``-rewrite``); review the diff before committing it.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from geotrain.orchestrator.rounds import (RoundState, admit, join, leaving, lose, next_round, record_arrival, refuse_update,
                                          ring_reform, round_ready)
from geotrain.units import parse_duration_ms

TESTDATA = Path(__file__).parent / "testdata"
REWRITE = os.environ.get("GEOTRAIN_REWRITE") == "1"  # read at import: conftest clears GEOTRAIN_* per test
SEPARATOR = "----"


class TranscriptError(Exception):
    """A transcript that cannot be run: unknown command, bad argument, missing ``----``."""


class TranscriptMismatch(AssertionError):
    """What the commands printed differs from what the transcript expects."""


@dataclass(frozen=True)
class Command:
    line: int
    """1-based line number in the file."""
    name: str
    args: tuple[str, ...]
    kwargs: dict[str, str]

    @property
    def where(self) -> str:
        return f"{self.line}: {self.name}"


@dataclass
class Block:
    commands: list[Command]
    expected: list[str]
    out_start: int
    """0-based index of the first expected line in the file (the line after ``----``)."""
    out_end: int
    """0-based index one past the last expected line."""


def parse(path: Path) -> tuple[list[str], list[Block]]:
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        text = lines[i].strip()
        if text == SEPARATOR:
            if not commands:
                raise TranscriptError(f"{path}:{i + 1}: '----' without a command before it")
            start = end = i + 1
            while end < len(lines) and lines[end].strip():
                end += 1
            blocks.append(Block(commands, lines[start:end], start, end))
            commands, i = [], end
            continue
        if text and not text.startswith("#"):
            name, *words = text.split()
            args = tuple(w for w in words if "=" not in w)
            kwargs = dict(w.split("=", 1) for w in words if "=" in w)
            commands.append(Command(i + 1, name, args, kwargs))
        i += 1
    if commands:
        raise TranscriptError(f"{path}:{commands[0].line}: {commands[0].name!r} has no '----' and expected output")
    return lines, blocks


def _sites(text: str) -> frozenset[str]:
    return frozenset(s for s in text.split(",") if s)


def _names(sites) -> str:
    return ",".join(sorted(sites)) or "-"


def _seconds(text: str, cmd: Command) -> float:
    try:
        return parse_duration_ms(text) / 1000.0
    except ValueError as exc:
        raise TranscriptError(f"{cmd.where}: {exc}") from None


@dataclass
class Coordinator:
    """The servicer's use of the pure decisions, with a simulated clock (orchestrator/server.py)."""

    sites: frozenset[str]
    state: RoundState
    timeout_s: float
    min_sites: int | None
    rings: bool
    quorum: int | None = None
    grace_s: float = 0.0
    final_round: int | None = None
    now: float = 0.0
    ring_round: int | None = None
    """The round the leaders merge in a ring (ring_reform said so), if any."""
    ring_failures: int = 0
    ring_abandoned_at: int = -1
    out: list[str] = field(default_factory=list)

    def say(self, decision) -> None:
        self.out.append(f"{decision.action}: {decision.reason}")

    def show(self, *extra: str) -> None:
        s = self.state
        words = [f"round={s.round}", f"expected={_names(s.expected)}"]
        if s.joining:
            words.append(f"joining={_names(s.joining)}")
        if s.lost:
            words.append(f"lost={_names(s.lost)}")
        if self.ring_round == s.round:
            words.append("merge=ring")
        self.out.append("state: " + " ".join(words + list(extra)))

    def check(self) -> None:
        decision = round_ready(self.now, self.state, self.timeout_s, self.min_sites, self.quorum, self.grace_s)
        self.say(decision)
        rnd = self.state.round
        if decision.action == "wait":
            return
        if self.ring_round == rnd and decision.action != "commit":  # a ring needs every site's part
            self.abandon()
            return
        if decision.action == "timeout":  # as Lane.reopen: the dead whose update is forgotten are not waited for
            self.state = RoundState(round=rnd, expected=self.state.expected - self.state.lost, joining=self.state.joining)
            self.show("(reopened: the round is retried)")
            return
        arrived = frozenset(self.state.arrived)
        self.state = next_round(self.state, leaving(self.state, decision), self.now)
        if self.ring_round == rnd:  # the ring held: the leaders keep merging in rings
            self.ring_failures = 0
            self.ring_round = rnd + 1
        elif self.rings:
            reform = ring_reform(rnd, sites=self.sites, arrived=arrived, next_expected=self.state.expected,
                                 failures=self.ring_failures, abandoned_at=self.ring_abandoned_at)
            self.say(reform)
            if reform.action == "ring":
                self.ring_round = rnd + 1
        self.show()

    def abandon(self) -> None:
        rnd = self.state.round
        if self.ring_round != rnd:
            raise TranscriptError(f"round {rnd} is not merged in a ring")
        if self.ring_abandoned_at != rnd:
            self.ring_failures += 1
            self.ring_abandoned_at = rnd
        self.ring_round = None
        self.state = RoundState(round=rnd, expected=self.state.expected, joining=self.state.joining)
        self.out.append(f"ring_abandoned: round {rnd} is merged through the star "
                        f"(failures={self.ring_failures} abandoned_at={self.ring_abandoned_at})")
        self.show()


def _config(cmd: Command) -> Coordinator:
    allowed = {"sites", "members", "round", "timeout", "min_sites", "quorum", "grace", "rounds"}
    unknown = set(cmd.kwargs) - allowed | (set(cmd.args) - {"rings"})
    if unknown or "sites" not in cmd.kwargs or "timeout" not in cmd.kwargs:
        raise TranscriptError(f"{cmd.where}: needs sites= and timeout=; unknown: {sorted(unknown)}")
    sites = _sites(cmd.kwargs["sites"])
    members = _sites(cmd.kwargs["members"]) if "members" in cmd.kwargs else sites
    min_sites = int(cmd.kwargs["min_sites"]) if "min_sites" in cmd.kwargs else None
    state = RoundState(round=int(cmd.kwargs.get("round", "0")), expected=members)
    quorum = int(cmd.kwargs["quorum"]) if "quorum" in cmd.kwargs else None
    grace_s = _seconds(cmd.kwargs["grace"], cmd) if "grace" in cmd.kwargs else 0.0
    return Coordinator(sites, state, _seconds(cmd.kwargs["timeout"], cmd), min_sites, "rings" in cmd.args,
                       quorum=quorum, grace_s=grace_s,
                       final_round=int(cmd.kwargs["rounds"]) if "rounds" in cmd.kwargs else None)


def _one_site(cmd: Command) -> str:
    if len(cmd.args) != 1:
        raise TranscriptError(f"{cmd.where}: expects one site, got {list(cmd.args)}")
    return cmd.args[0]


def execute(coord: Coordinator | None, cmd: Command) -> Coordinator:
    """Runs one command; its output is appended to the coordinator's ``out``."""
    if cmd.name == "config":
        coord = _config(cmd)
        coord.show()
        return coord
    if cmd.name not in ("join", "arrive", "refuse", "lost", "tick", "abandon"):
        raise TranscriptError(f"{cmd.where}: unknown command")
    if coord is None:
        raise TranscriptError(f"{cmd.where}: 'config' must come first")
    if cmd.name == "join":
        coord.state, start_version, decision = join(coord.state, _one_site(cmd), coord.now, coord.final_round)
        coord.say(decision)
        coord.show(f"start_version={start_version}")
    elif cmd.name == "arrive":
        site = _one_site(cmd)
        if "round" not in cmd.kwargs:
            raise TranscriptError(f"{cmd.where}: needs round=")
        if "at" in cmd.kwargs:
            at = _seconds(cmd.kwargs["at"], cmd)
            if at < coord.now:
                raise TranscriptError(f"{cmd.where}: at={cmd.kwargs['at']} is before the clock ({coord.now:g}s)")
            coord.now = at
        decision = admit(coord.state, site, int(cmd.kwargs["round"]))
        coord.say(decision)
        if decision:
            coord.state = record_arrival(coord.state, site, coord.now)
            coord.check()
    elif cmd.name == "refuse":
        site = _one_site(cmd)
        if "round" not in cmd.kwargs:
            raise TranscriptError(f"{cmd.where}: needs round=")
        coord.state, decision = refuse_update(coord.state, site, int(cmd.kwargs["round"]),
                                              cmd.kwargs.get("why", "non_finite"))
        coord.say(decision)
        if decision.action == "drop":
            coord.show()
            coord.check()
    elif cmd.name == "lost":
        coord.state, decision = lose(coord.state, _one_site(cmd), cmd.kwargs.get("why", "killed"), coord.min_sites)
        coord.say(decision)
        if decision.action != "ignore":
            coord.show()
        if decision.action == "drop_lost":
            coord.check()
    elif cmd.name == "tick":
        if len(cmd.args) != 1:
            raise TranscriptError(f"{cmd.where}: expects one duration")
        coord.now += _seconds(cmd.args[0], cmd)
        coord.check()
    else:
        try:
            coord.abandon()
        except TranscriptError as exc:
            raise TranscriptError(f"{cmd.where}: {exc}") from None
    return coord


def run_transcript(path: Path, rewrite: bool = False) -> None:
    """Runs every block of ``path``; raises :class:`TranscriptMismatch` with a diff per differing
    block (naming the file and line), or rewrites the expected output in place."""
    lines, blocks = parse(path)
    coord: Coordinator | None = None
    failures: list[str] = []
    actual_per_block: list[list[str]] = []
    for block in blocks:
        actual: list[str] = []
        for cmd in block.commands:
            before = len(coord.out) if coord is not None else 0
            try:
                nxt = execute(coord, cmd)
            except TranscriptError as exc:
                raise TranscriptError(f"{path}:{exc}") from None
            if nxt is not coord:
                before = 0  # a new config prints afresh
            coord = nxt
            actual += coord.out[before:]
        actual_per_block.append(actual)
        if actual != block.expected:
            diff = difflib.unified_diff(block.expected, actual, "expected", "actual", lineterm="")
            failures.append(f"{path}:{block.commands[0].line}: the output of lines {block.commands[0].line}-"
                            f"{block.out_start} differs\n"
                            + "\n".join(diff))
    if rewrite:
        for block, actual in reversed(list(zip(blocks, actual_per_block))):
            lines[block.out_start:block.out_end] = actual
        path.write_text("\n".join(lines) + "\n")
        return
    if failures:
        raise TranscriptMismatch("\n\n".join(failures) + "\n\n(GEOTRAIN_REWRITE=1 rewrites the expectations)")


# -- the transcripts ---------------------------------------------------------------------------

TRANSCRIPTS = sorted(TESTDATA.glob("*.txt"))


def test_there_are_transcripts():
    assert len(TRANSCRIPTS) >= 8, TRANSCRIPTS


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript(path):
    run_transcript(path, rewrite=REWRITE)


# -- the interpreter itself --------------------------------------------------------------------

GOOD = """\
# all arrive
config sites=eu,us timeout=10s
----
state: round=0 expected=eu,us

arrive eu round=0 at=1s
arrive us round=0 at=2s
----
accept: update from 'eu' accepted for round 0
wait: round 0: waiting for us
accept: update from 'us' accepted for round 0
commit: all 2 sites reported for round 0
state: round=1 expected=eu,us
"""


def test_a_correct_transcript_passes(tmp_path):
    path = tmp_path / "good.txt"
    path.write_text(GOOD)
    run_transcript(path)


def test_a_wrong_expectation_fails_with_a_diff_naming_file_and_line(tmp_path):
    path = tmp_path / "wrong.txt"
    path.write_text(GOOD.replace("commit: all 2 sites", "commit: all 3 sites"))
    with pytest.raises(TranscriptMismatch) as err:
        run_transcript(path)
    text = str(err.value)
    assert f"{path}:6:" in text, text
    assert "-commit: all 3 sites reported for round 0" in text and "+commit: all 2 sites reported for round 0" in text


def test_a_missing_output_line_fails(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(GOOD.replace("state: round=1 expected=eu,us\n", ""))
    with pytest.raises(TranscriptMismatch, match=r"\+state: round=1 expected=eu,us"):
        run_transcript(path)


def test_rewrite_fixes_the_expectations_and_keeps_the_comments(tmp_path):
    path = tmp_path / "rewrite.txt"
    path.write_text(GOOD.replace("commit: all 2 sites", "commit: all 3 sites").replace("wait: round 0: waiting for us\n", ""))
    run_transcript(path, rewrite=True)
    assert path.read_text() == GOOD
    run_transcript(path)


def test_rewrite_fills_in_an_empty_expectation(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("config sites=eu timeout=1s\n----\n\njoin eu\n----\n")
    run_transcript(path, rewrite=True)
    assert path.read_text() == ("config sites=eu timeout=1s\n----\nstate: round=0 expected=eu\n\njoin eu\n----\n"
                                "member: 'eu' is a member of round 0\nstate: round=0 expected=eu start_version=0\n")


@pytest.mark.parametrize("text, message", [
    ("config sites=eu timeout=1s\n----\nstate: round=0 expected=eu\n\nfly eu\n----\n", r":5: fly: unknown command"),
    ("join eu\n----\n", r"'config' must come first"),
    ("config sites=eu timeout=1s\n", r"has no '----'"),
    ("----\n", r"'----' without a command"),
    ("config sites=eu timeout=soon\n----\n", r"expected a duration"),
    ("config sites=eu timeout=1s colour=red\n----\n", r"unknown: \['colour'\]"),
    ("config sites=eu timeout=1s\narrive eu round=0 at=5s\narrive eu round=0 at=1s\n----\n", r"before the clock"),
    ("config sites=eu timeout=1s\nabandon\n----\n", r"not merged in a ring"),
])
def test_a_broken_transcript_is_an_error_not_a_pass(tmp_path, text, message):
    path = tmp_path / "broken.txt"
    path.write_text(text)
    with pytest.raises(TranscriptError, match=message):
        run_transcript(path)
