"""The analysis, control and WAN modules were split by concept (issue #10); every name other code
imports from the old module paths must still be importable from there, and be the same object as
in its new home."""

import importlib

import pytest

MOVED = [
    ("geotrain.analysis.check", "geotrain.analysis.history", ["Verdict", "INVARIANTS", "HELD", "VIOLATED", "UNKNOWN"]),
    ("geotrain.analysis.check", "geotrain.analysis.check_outcomes", ["verify_manifest", "final_eval_loss"]),
    ("geotrain.analysis.report", "geotrain.analysis.rundir", ["Run", "load_run"]),
    ("geotrain.analysis.report", "geotrain.analysis.plotdata", ["coalesce", "series", "timeline", "Series", "Timeline"]),
    ("geotrain.analysis.report", "geotrain.analysis.figures", ["loss_figure", "timeline_figure", "links_figure"]),
    ("geotrain.analysis.sweep", "geotrain.analysis.sweep_grid", ["SweepError", "expand", "parse_grid", "parse_grids"]),
    ("geotrain.analysis.sweep", "geotrain.analysis.sweep_results", ["render_csv", "render_markdown", "result_of"]),
    ("geotrain.analysis.exporters", "geotrain.analysis.tensorboard_export",
     ["TensorBoardExporter", "export_tensorboard", "read_scalars", "read_texts", "_summary_values"]),
    ("geotrain.analysis.exporters", "geotrain.analysis.prometheus_export", ["PrometheusExporter"]),
    ("geotrain.control.plane", "geotrain.control.etcd_server", ["EtcdServer", "find_etcd"]),
    ("geotrain.control.plane", "geotrain.control.etcd_client", ["parse_endpoint"]),
    ("geotrain.control.plane", "geotrain.control.lease", ["Registration"]),
    ("geotrain.wan.link", "geotrain.wan.shaping", ["MSS", "LinkParams"]),
    ("geotrain.wan.link", "geotrain.wan.proxy", ["LinkProxy"]),
    ("geotrain.wan.ring", "geotrain.wan.ring_wire", ["HEADER_BYTES", "HELLO_BYTES", "PIECE", "ring_all_reduce_bytes"]),
    ("geotrain.wan.ring", "geotrain.wan.hierarchical", ["hierarchical_all_reduce", "hierarchical_groups"]),
]


@pytest.mark.parametrize("old, new, names", MOVED, ids=[f"{o}<-{n}" for o, n, _ in MOVED])
def test_moved_names_stay_importable_from_the_old_path(old, new, names):
    old_mod, new_mod = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(old_mod, name) is getattr(new_mod, name), f"{old}.{name}"


def test_main_entry_points_stay_where_the_cli_finds_them():
    for module in ("geotrain.analysis.check", "geotrain.analysis.report", "geotrain.analysis.sweep", "geotrain.wan.link"):
        assert callable(importlib.import_module(module).main), module
    assert importlib.import_module("geotrain.control.plane").ControlPlane.__module__ == "geotrain.control.plane"
    assert importlib.import_module("geotrain.wan.ring").RingPeer.__module__ == "geotrain.wan.ring"
