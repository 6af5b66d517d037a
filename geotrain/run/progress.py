"""Live progress of a run in the terminal (rich): per site round, step, loss, tokens/s; WAN bytes.

It tails the run's metrics.jsonl (never blocks training: it only reads what was written) and
the link counters. When stderr is not a terminal it prints one plain line per committed round.
The first sign that the global model went non-finite, and every failure and recovery (a restart as
it happens), are printed as one line each, in either mode.
"""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from geotrain.events import EventTail
from geotrain.run.summary import nonfinite_model, security_summary
from geotrain.units import human_bytes
from geotrain.worker.metrics import scalars_of


def _num(v) -> str:
    """A number with 4 significant digits (``2.831``, ``0.08467``, ``1.23e-05``)."""
    return "-" if v is None else f"{v:.4g}"


class Progress:
    def __init__(self, launcher, console: Console | None = None):
        self.launcher = launcher
        self.topo = launcher.topo
        self.console = console or Console(stderr=True)
        self._tail = EventTail(launcher.run_dir / "metrics.jsonl")
        self.sites = {s.name: {"round": 0, "step": 0, "loss": None, "t0": None, "tokens": 0} for s in self.topo.sites}
        self.eval_loss = None
        self.eval_name = "loss"
        self.commits = 0
        self.model_shown = False
        self.diverged: str | None = None  # the first sign that the global model went non-finite
        self.t0 = time.time()
        self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False) \
            if self.console.is_terminal else None
        warning = security_summary(self.topo).get("warning")
        if warning:  # said before anything else, in either mode
            self.console.print(f"warning: {warning}", style="bold yellow", highlight=False)
        if self.live:
            self.live.start()

    def _read(self) -> list[dict]:
        return self._tail.read()

    def _wan_bytes(self) -> int:
        total = 0
        for path in self.launcher.link_stats.values():
            try:
                st = json.loads(path.read_text())
                total += st.get("bytes_forward", 0) + st.get("bytes_backward", 0)
            except (FileNotFoundError, json.JSONDecodeError):
                pass
        return total

    def update(self) -> None:
        tr = self.topo.training
        for e in self._read():
            kind = e.get("event")
            if self.diverged is None and (reason := nonfinite_model(e)) is not None:
                self.diverged = reason
                self.console.print(f"the global model went non-finite: {reason}", style="bold red", highlight=False)
            if kind == "inner_step" and e.get("site") in self.sites:
                s = self.sites[e["site"]]
                s.update(step=e["step"], round=e["round"], loss=e.get("loss"))
                s["t0"] = s["t0"] or e["t"]
                if e.get("tokens"):  # only when the model declared its tokens per step
                    s["tokens"] += int(e["tokens"]) * self.topo.site(e["site"]).world_size
                s["t"] = e["t"]
            elif kind == "model" and not self.model_shown:  # printed once, though restarts write it again
                self.model_shown = True
                self.console.print(model_line(e), highlight=False, soft_wrap=True)
            elif kind == "eval":
                self.eval_loss = e["loss"]
                self.eval_name = e.get("metric") or "loss"
                if not self.live:
                    where = f"  {e['site']}" if e.get("site") else ""
                    self.console.print(f"eval{where}  round {e['round']:>4}  step {e['step']:>6}  {self.eval_name} "
                                       f"{_num(e['loss'])}  WAN {human_bytes(self._wan_bytes())}", highlight=False)
            elif kind == "metric" and e.get("site") in self.sites and e.get("rank", 0) == 0:
                self.sites[e["site"]]["metrics"] = scalars_of(e)
            elif kind == "commit":
                self.commits += 1
                ddp = tr.algorithm == "ddp"  # commits every step: one line per H of them
                every_h = not ddp or (e["round"] + 1) % tr.inner_steps == 0
                if not self.live and tr.algorithm != "streaming-diloco" and every_h:
                    shown = (e["round"] + 1) // tr.inner_steps if ddp else e["round"] + 1
                    self.console.print(f"round {shown:>4}/{tr.rounds} committed  "
                                       f"sites {len(e.get('sites') or ()) or '-'}  WAN {human_bytes(self._wan_bytes())}"
                                       + self._metrics_text(), highlight=False)
            elif kind == "failure":  # restarts as they happen, in either mode
                self.console.print(f"failure  {e.get('target')}: {str(e.get('reason'))[:200]}", style="yellow",
                                   highlight=False)
            elif kind == "recovery":
                lost = e.get("rounds_lost") or 0
                self.console.print(f"recovered  {e.get('target')} after {e.get('seconds', 0):.1f}s"
                                   + (f", {lost} round{'s' if lost != 1 else ''} lost" if lost else ""), highlight=False)
            elif kind == "merge" and e.get("site") in self.sites and "fragment" not in e:
                s = self.sites[e["site"]]
                # async: a site counts its own merges; synchronous: the version it now holds
                s["round"] = s["round"] + 1 if tr.algorithm == "async-diloco" else max(s["round"], e.get("version", 0))
        if self.live:
            self.live.update(self._table())

    def _metrics_text(self) -> str:
        """The scripts' latest scalars (diloco.log), per site: "  paris acc 0.91"."""
        parts = [f"{site} " + " ".join(f"{k} {_num(v)}" for k, v in list(s["metrics"].items())[:4])
                 for site, s in self.sites.items() if s.get("metrics")]
        return ("  " + "  ".join(parts)) if parts else ""

    def _table(self) -> Table:
        tr = self.topo.training
        total = tr.rounds * tr.inner_steps
        t = Table(title=f"geotrain {self.topo.name}: {tr.algorithm}, H={tr.inner_steps}, "
                        f"eval {self.eval_name} {_num(self.eval_loss)}, "
                        f"WAN {human_bytes(self._wan_bytes())}, {time.time() - self.t0:.0f}s", title_justify="left")
        for col in ("site", "round", "step", "loss", "tokens/s"):
            t.add_column(col, justify="right" if col != "site" else "left")
        for name, s in self.sites.items():
            elapsed = (s.get("t") or 0) - (s["t0"] or 0)
            tps = f"{s['tokens'] / elapsed:,.0f}" if elapsed > 0 and s["tokens"] else "-"
            t.add_row(name, f"{s['round']}/{tr.rounds}", f"{s['step']}/{total}",
                      "-" if s["loss"] is None else f"{s['loss']:.3f}", tps)
        return t

    def close(self) -> None:
        self.update()
        if self.live:
            self.live.stop()


def model_line(e: dict) -> str:
    """``model (35m)  19.6M parameters, 6 layers × 512 wide, context 1024, vocab 256, 146 MFLOP/token (training), cpu``."""
    def si(v: float) -> tuple[str, str]:
        for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(v) >= scale:
                return f"{v / scale:.3g}", unit
        return f"{v:.3g}", ""

    params, flops = si(e.get("params") or 0), si(e.get("flops_per_token") or 0)
    preset = f" ({e['preset']})" if e.get("preset") else ""
    return (f"model{preset}  {''.join(params)} parameters, {e.get('n_layer')} layers × {e.get('n_embd')} wide, "
            f"context {e.get('block_size')}, vocab {e.get('vocab_size')}, {flops[0]} {flops[1]}FLOP/token "
            f"(training), {e.get('device')}{' bf16' if e.get('bf16') else ''}")


def make_progress(launcher):
    return Progress(launcher)
