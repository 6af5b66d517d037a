"""What the report's plots draw (geotrain.analysis.plotdata), asserted on numbers and labels, not pixels;
and the few figure facts a reader sees first (legend entries, axis labels)."""

from __future__ import annotations

import pytest

from geotrain.analysis.figures import links_figure, metric_figure, timeline_figure
from geotrain.analysis.plotdata import (Line, absent_plots, byte_unit, bytes_panel, crop_bounds, eval_lines,
                                        figure_plan, fmt_sig, metric_lines, metric_plots, same_values, timeline)
from geotrain.analysis.rundir import Run

T0 = 1_700_000_000.0
SITES = ("us-east", "eu-west")


def run_of(events: list[dict], *, links: dict | None = None, label: str = "r (diloco)") -> Run:
    topo = {"name": "r", "sites": [{"name": s, "workers": 2} for s in SITES], "coordinator": {"at": "hub"},
            "training": {"algorithm": "diloco", "inner_steps": 2, "rounds": 2}}
    return Run(path=__import__("pathlib").Path("/nonexistent/r"), events=[{"t": T0, "event": "run_started"}, *events],
               summary=None, topology=topo, link_files=links or {}, label=label)


def sdk_events(*, same_eval: bool = True) -> list[dict]:
    """Two sites x two ranks logging lr (the same everywhere) and train_mse (each rank its own), an eval
    of "mse" per site per round, a merge per site per round."""
    ev = []
    for r in range(2):
        for k in range(2):
            step = 2 * r + k
            for s_i, s in enumerate(SITES):
                for rank in range(2):
                    ev.append({"t": T0 + 1 + step, "event": "metric", "site": s, "rank": rank, "round": r, "step": step,
                               "lr": 0.1, "train_mse": 1.0 / (step + 1) + 0.01 * (2 * s_i + rank)})
                ev.append({"t": T0 + 1 + step, "event": "inner_step", "site": s, "step": step + 1, "round": r,
                           "compute_s": 0.5})
        for s_i, s in enumerate(SITES):
            ev.append({"t": T0 + 3.5 + 2 * r, "event": "merge", "site": s, "round": r, "bytes_sent": 500,
                       "bytes_received": 700, "seconds": 0.25})
            ev.append({"t": T0 + 3.6 + 2 * r + 0.01 * s_i, "event": "eval", "site": s, "round": r + 1,
                       "step": 2 * r + 2, "loss": 0.5 / (r + 1) + (0 if same_eval else 0.1 * s_i), "metric": "mse"})
    return ev


# ---------------------------------------------------------------------------------------------- units

@pytest.mark.parametrize("values, unit", [([], "B"), ([0, 0], "B"), ([812], "B"), ([999.6], "kB"),
                                          ([13_600, 10], "kB"), ([9.65e6], "MB"), ([2.1e9], "GB")])
def test_byte_unit_fits_the_largest_value(values, unit):
    assert byte_unit(values)[0] == unit


@pytest.mark.parametrize("v, text", [(0, "0"), (0.00123456, "0.00123"), (1.5, "1.5"), (12.34, "12.3"),
                                     (812.4, "812"), (4096, "4096"), (float("nan"), "–")])
def test_fmt_sig_never_writes_an_exponent(v, text):
    assert fmt_sig(v) == text


# ---------------------------------------------------------------------------------------------- lines

def test_one_eval_line_per_site_never_joined():
    lines = eval_lines(run_of(sdk_events()))
    assert list(lines) == ["mse"]
    assert [ln.who for ln in lines["mse"]] == list(SITES)  # topology order
    east = lines["mse"][0]
    assert east.steps == [2.0, 4.0] and east.values == [0.5, 0.25]
    # WAN bytes at an eval: every site's merges of the rounds before it (synchronous diloco)
    assert east.wan_bytes == [2 * 1200.0, 4 * 1200.0]


def test_scalars_several_ranks_log_get_a_line_per_rank():
    lines = metric_lines(run_of(sdk_events()))
    assert sorted(lines) == ["lr", "train_mse"]
    assert [ln.who for ln in lines["train_mse"]] == ["us-east/0", "us-east/1", "eu-west/0", "eu-west/1"]
    assert lines["train_mse"][0].steps == [0.0, 1.0, 2.0, 3.0]


def test_lines_with_the_same_values_are_grouped_and_others_are_not():
    lr = metric_lines(run_of(sdk_events()))["lr"]
    assert [[ln.who for ln in g] for g in same_values(lr)] == [["us-east/0", "us-east/1", "eu-west/0", "eu-west/1"]]
    mse = metric_lines(run_of(sdk_events()))["train_mse"]
    assert len(same_values(mse)) == 4  # each rank its own batch: nothing hides anything
    evals = eval_lines(run_of(sdk_events()))["mse"]
    assert len(same_values(evals, "steps")) == 1  # both sites evaluate the same model
    assert len(same_values(evals, "wall_s")) == 2  # ... but not at the same instant
    assert len(same_values(eval_lines(run_of(sdk_events(same_eval=False)))["mse"], "steps")) == 2
    a = Line(run="a", who="x", status="completed", steps=[1.0], values=[1.0])
    b = Line(run="b", who="x", status="completed", steps=[1.0], values=[1.0])
    assert len(same_values([a, b])) == 2  # two runs are never one line


def test_the_legend_names_every_member_of_a_group_once():
    plots = {p.name: p for p in metric_plots([run_of(sdk_events())])}

    def legend(plot, x="steps"):
        fig = metric_figure(plot, x)
        try:
            return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        finally:
            __import__("matplotlib.pyplot").pyplot.close(fig)
    assert legend(plots["lr"]) == ["us-east/0, us-east/1, eu-west/0, eu-west/1  (the same values)"]
    assert legend(plots["train_mse"]) == ["us-east/0", "us-east/1", "eu-west/0", "eu-west/1"]
    assert legend(plots["mse"], "time") == ["us-east", "eu-west"]


def test_plot_labels_are_the_metrics_own_names():
    plots = metric_plots([run_of(sdk_events())])
    assert [(p.kind, p.name, p.ylabel) for p in plots] == [("eval", "mse", "eval mse"), ("metric", "lr", "lr"),
                                                          ("metric", "train_mse", "train_mse")]
    fig = metric_figure(plots[0], "wan")
    try:
        ax = fig.axes[0]
        assert ax.get_ylabel() == "eval mse"
        assert ax.get_xlabel().startswith("merge bytes through WAN links (kB, ")
        assert ax.get_title() == "eval mse vs WAN traffic"
    finally:
        __import__("matplotlib.pyplot").pyplot.close(fig)


# ---------------------------------------------------------------------------------------------- the plan

def test_figure_plan_names_files_and_says_it_for_people():
    specs, absent = figure_plan([run_of(sdk_events())])
    assert [s.file for s in specs] == ["report-eval-mse-vs-steps.png", "report-eval-mse-vs-time.png",
                                       "report-eval-mse-vs-wan-bytes.png", "report-metric-lr-vs-steps.png",
                                       "report-metric-train_mse-vs-steps.png", "report-timeline.png",
                                       "report-link-bytes.png"]
    assert [s.alt for s in specs[:4]] == ["eval mse vs inner steps", "eval mse vs wall time", "eval mse vs WAN bytes",
                                          "lr vs inner steps"]
    assert not any("wan-bytes" in s.alt for s in specs)
    assert absent == []


def test_what_is_absent_is_said():
    no_evals = [e for e in sdk_events() if e["event"] not in ("eval", "metric")]
    specs, absent = figure_plan([run_of(no_evals)])
    assert [s.kind for s in specs] == ["timeline", "bytes"]
    assert absent == ["r (diloco): no eval plot — the run has no `eval` events (a script reports one with "
                      "`diloco.log_eval(value, metric=...)`)."]
    nothing = run_of([])
    specs, absent = figure_plan([nothing])
    assert specs == []
    assert any("no timeline" in a for a in absent) and any("no WAN bytes plot" in a for a in absent)
    # evals before any merge: no plot against WAN bytes, and the reason
    early = [e for e in sdk_events() if e["event"] != "merge"]
    _, absent = figure_plan([run_of(early)])
    assert "eval mse vs WAN bytes: no merge crossed a WAN link before an eval (all evals at 0 bytes)." in absent
    assert absent_plots([run_of(early)]) == []


# ---------------------------------------------------------------------------------------------- bytes

def test_bytes_panel_is_in_the_topologys_site_order():
    links = {"eu-west<->hub": {"bytes_forward": 1, "bytes_backward": 2},
             "ring r0: eu-west->us-east": {"bytes_forward": 5, "bytes_backward": 0},
             "us-east<->hub": {"bytes_forward": 3, "bytes_backward": 4}}
    source, values = bytes_panel(run_of(sdk_events(), links=links))
    assert source == "link emulator counters"
    assert list(values) == ["us-east<->hub", "eu-west<->hub", "ring r0: eu-west->us-east"]
    source, values = bytes_panel(run_of(sdk_events()))  # no counters: the sites' merges
    assert source.startswith("merge payloads")
    assert values == {"us-east": (1000, 1400), "eu-west": (1000, 1400)}
    assert bytes_panel(run_of([])) == ("", {})
    fig = links_figure([run_of(sdk_events(), links=links)])
    try:
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == list(bytes_panel(run_of(sdk_events(),
                                                                                        links=links))[1])
        assert ax.get_ylabel() == "bytes (B)"
    finally:
        __import__("matplotlib.pyplot").pyplot.close(fig)


# ---------------------------------------------------------------------------------------------- timeline

def test_crop_bounds_cover_the_training_only():
    assert crop_bounds([], 10.0) == (0.0, 10.0, 0.0, 10.0)
    view_start, view_end, first, last = crop_bounds([(7.0, 8.0), (9.0, 10.0)], 20.0)
    assert (first, last) == (7.0, 10.0)
    assert view_start == pytest.approx(7.0 - 0.09) and view_end == pytest.approx(10.0 + 0.09)
    assert crop_bounds([(0.0, 1.0)], 1.0)[:2] == (0.0, pytest.approx(1.03))


def test_timeline_measures_startup_and_shutdown():
    ev = sdk_events() + [{"t": T0 + 30.0, "event": "run_finished", "status": "completed"}]
    tl = timeline(run_of(ev))
    assert list(tl.sites) == list(SITES)
    assert tl.train_start == pytest.approx(0.5)  # the first step ended at 1.0 s after computing 0.5 s
    assert tl.train_end == pytest.approx(5.61)  # the last eval
    assert tl.startup_s == pytest.approx(0.5) and tl.shutdown_s == pytest.approx(30.0 - 5.61)
    fig = timeline_figure(run_of(ev), tl)
    try:
        assert fig.axes[0].get_xlabel() == "time since the run started (s)"
        assert fig.axes[0].get_xlim()[1] < 10  # not squeezed into the 30 s of the whole run
    finally:
        __import__("matplotlib.pyplot").pyplot.close(fig)
