"""A real launch's merges against the physical minimum, judged from the run's own events (issue #14).

    .venv/bin/python benchmarks/launch_merge.py [--rounds 8] [--bandwidth 1gbit] [--latency-ms 5]

`geotrain launch topologies/demo.yaml` with 2 sites of 1 worker, the built-in GPT at 6 layers x 384 wide
(10.7M parameters, 43 MB of float32 each way), and every site's WAN link at ``--bandwidth`` and
``--latency-ms`` one way, no jitter. After the run, from its metrics.jsonl alone:

- per round, each site's ``merge`` event: its start (``t - seconds``), ``seconds``, ``bytes_sent`` and
  ``bytes_received`` (what crossed its link);
- the site that arrived last (latest start) is the one whose merge the WAN bounds: nobody waits for it
  to finish its steps, so its merge time is all transfer and commit. Its minimum is
  ``1 RTT + bytes_sent / bandwidth + bytes_received / bandwidth``;
- printed: per round that site's seconds, its minimum and the ratio; the median ratio (target <= 1.15);
  the coordinator's ``commit`` ``answer_s`` beside it (from the last arrival to the answer's first message
  being ready: the mean, the outer step, the answer's stream) and ``apply_s`` (to the round being durable,
  which the answer's last message waits for), with its ``persist_s`` (the state file) and ``publish_s``
  (the run state in etcd), made while the answer streams.

The first round is shown but not in the median (a fresh connection and coordinator). One run, no
assertions. Writes benchmarks/results/launch_merge.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, launch, save  # noqa: E402

from geotrain.units import parse_bandwidth_mbps  # noqa: E402


def merges_by_round(events: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for e in events:
        if e.get("event") == "merge" and isinstance(e.get("seconds"), (int, float)):
            out.setdefault(int(e["round"]), []).append(e)
    return out


def judge(events: list[dict], mbit: float, latency_ms: float, nsites: int) -> list[dict]:
    """Per round with every site's merge: the last arriver's seconds against its minimum."""
    commits = {int(e["round"]): e for e in events if e.get("event") == "commit" and "round" in e}
    rows = []
    for r, ms in sorted(merges_by_round(events).items()):
        if len(ms) < nsites:
            continue
        last = max(ms, key=lambda e: e["t"] - e["seconds"])
        minimum = 2 * latency_ms / 1000 + (last["bytes_sent"] + last["bytes_received"]) * 8 / (mbit * 1e6)
        rows.append({"round": r, "site": last["site"], "seconds": last["seconds"], "minimum_s": minimum,
                     "ratio": last["seconds"] / minimum, "bytes_sent": last["bytes_sent"],
                     "bytes_received": last["bytes_received"], "apply_s": commits.get(r, {}).get("apply_s"),
                     "answer_s": commits.get(r, {}).get("answer_s"),
                     "persist_s": commits.get(r, {}).get("persist_s"), "publish_s": commits.get(r, {}).get("publish_s"),
                     "lead_s": (last["t"] - last["seconds"]) - min(e["t"] - e["seconds"] for e in ms)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--bandwidth", default="1gbit")
    ap.add_argument("--latency-ms", type=float, default=5.0)
    ap.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="more topology overrides")
    args = ap.parse_args()
    extra = args.set
    mbit = parse_bandwidth_mbps(args.bandwidth)
    run_dir = Path(tempfile.mkdtemp(prefix="geotrain-launch-merge-")) / "run"
    overrides = ["sites[0].workers=1", "sites[1].workers=1", "model.n_layer=6", "model.n_head=6", "model.n_embd=384",
                 f"links.default.bandwidth={args.bandwidth}", f"links.default.latency={args.latency_ms}ms",
                 "links.default.jitter=0ms", f"training.rounds={args.rounds}", "training.inner_steps=5",
                 "training.eval_batches=2", "training.batch_size=8", *extra]
    summary = launch(REPO / "topologies" / "demo.yaml", *overrides, run_dir=run_dir)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    params = next((e.get("params") for e in events if e.get("event") == "model"), None)
    rows = judge(events, mbit, args.latency_ms, 2)
    for row in rows:
        print(f"round {row['round']:2d}: last arriver {row['site']:8s} {row['seconds']:6.3f} s  minimum "
              f"{row['minimum_s']:6.3f} s  ratio {row['ratio']:5.2f}  (arrived {row['lead_s']:6.3f} s after the "
              f"first; answer ready after {row['answer_s']} s; commit apply_s {row['apply_s']}, of it persist_s {row['persist_s']}, publish_s {row['publish_s']})")
    later = [row["ratio"] for row in rows[1:]]
    median = statistics.median(later) if later else None
    print(f"model {params} parameters; median last-arriver merge / minimum, rounds after the first: "
          f"{median if median is None else round(median, 3)}  (target <= 1.15)")
    path = save("launch_merge", {"params": params, "bandwidth_mbit": mbit, "latency_ms": args.latency_ms,
                                 "rounds": rows, "median_ratio": median, "status": summary.get("status"),
                                 "run_dir": str(run_dir)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
