"""`geotrain sweep --preset outer-lr`: the papers' outer-lr sweep, as a dry run (every point validated, nothing run)."""

from __future__ import annotations

from geotrain.analysis.sweep import PRESETS, main
from tests.integration.helpers import REPO


def test_outer_lr_preset_plans_the_papers_five_points(tmp_path, capsys):
    rc = main([str(REPO / "topologies" / "demo.yaml"), "--preset", "outer-lr", "--out", str(tmp_path / "s"),
               "--dry-run"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "5 points of" in out.err and "all valid" in out.err
    assert PRESETS["outer-lr"] == ("training.outer_optimizer.lr=0.2,0.4,0.6,0.8,1.0",)


def test_a_preset_and_a_grid_on_the_same_field_are_refused(tmp_path, capsys):
    rc = main([str(REPO / "topologies" / "demo.yaml"), "--preset", "outer-lr", "--grid",
               "training.outer_optimizer.lr=0.5,0.6", "--out", str(tmp_path / "s"), "--dry-run"])
    assert rc == 2 and "training.outer_optimizer.lr" in capsys.readouterr().err


def test_an_unknown_preset_is_a_usage_error(tmp_path, capsys):
    assert main([str(REPO / "topologies" / "demo.yaml"), "--preset", "nope", "--dry-run"]) == 2
    assert "invalid choice" in capsys.readouterr().err
