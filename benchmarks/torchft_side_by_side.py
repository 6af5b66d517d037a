"""geotrain beside PyTorch's torchft (DiLoCo) on the same work, from one run of each on this machine.

    .venv/bin/python benchmarks/torchft_side_by_side.py [--rounds 8] [--kill-step 45] [--no-fault]

Same work on both sides: the built-in GPT with the demo topology's model config, the stdlib corpus
(geotrain/worker/data.py), the same model seed and the same per-worker data seeds (computed here with
geotrain's own ``worker_seed``), 2 sites = 2 torchft replica groups of 1 worker each, H=10, inner AdamW
(the topology's lr/betas/weight decay), outer SGD Nesterov lr 0.7 momentum 0.9, the topology's number of
rounds, one thread per worker, and the first site/replica evaluating the global model on the same held-out
batches at start and after every round. Everything runs on loopback.

* geotrain: ``geotrain launch topologies/demo.yaml`` with one worker per site and both WAN links at
  100 Gbit/s, 0 ms, 0 jitter. Both sites still go through a link emulator process, symmetrically. The
  alternative, ``coordinator.at=us-east``, takes away only one site's link: the round then waits on the
  other site, which still goes through a proxy, so the sync cost includes the proxy either way. With
  the symmetric setting both sites take the same path, as both torchft replicas do.
* torchft: this script makes its own virtual environment (``benchmarks/.torchft/.venv``, git-ignored by
  the repo's ``.venv/`` rule) with ``pip install torch==2.13.0 torchft numpy``, starts
  ``torchft_lighthouse --min_replicas 2`` and runs this same file as each replica's worker
  (``--torchft-worker``), with ``torchft.local_sgd.DiLoCo``, ``torchft.Manager``
  (use_async_quorum=False, as DiLoCo requires) and ``ProcessGroupGloo``. The worker imports geotrain's
  own ``worker/model.py`` and ``worker/data.py`` by path (no copy). min_replicas 2 is like geotrain,
  whose rounds wait for every site.

Sync overhead per round: geotrain's ``merge`` events (``seconds``, measured by the site leader
around the whole merge); torchft's time in DiLoCo's optimizer post-hook on a sync step (start_quorum,
pseudo-gradient allreduce, should_commit, outer step), measured by wrapping that hook. Per round the
*last site to arrive* waits for no one, so its time is the protocol's own cost ("last arriver"); the
mean over sites also counts waiting for the slower site (site 0 evaluates after every round).

Fault: SIGKILL the second site's worker (eu-west/0 and torchft replica 1) once it has logged inner step
``--kill-step``. geotrain's launcher restarts the site by itself. For torchft this script restarts the
replica as soon as it sees it die (polling every 0.2 s, like geotrain's launcher). Reported: seconds the
surviving site sat blocked in its sync, seconds from the kill to the first round committed with the
restarted replica, wall time against the clean run, and work lost (inner steps the killed site ran
that never reached a committed update, and rounds whose global update had no update of the killed site's own).

Prints ratios (geotrain / torchft) from one run of each. Writes benchmarks/results/torchft_side_by_side.json.
No assertions: the box is a noisy shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV = HERE / ".torchft" / ".venv"  # ignored by the repo's ".venv/" rule
TOPOLOGY = REPO / "topologies" / "demo.yaml"
LOOPBACK_LINKS = ("links.default.bandwidth=100gbit", "links.default.latency=0ms", "links.default.jitter=0ms")
RECIPE = ("training.inner_optimizer.schedule.kind=constant", "training.inner_optimizer.schedule.warmup_steps=0",
          "training.inner_optimizer.clip_grad_norm=null", "training.outer_optimizer.schedule.warmup_steps=0")
"""What torchft's DiLoCo does not have (an inner schedule, clipping, an outer warmup) is off on geotrain's side
too, so that both train the same way (demo.yaml's tuned recipe has them since issue #13)."""
STANDBY = ("recovery.warm_standby=true",)
"""geotrain's restart path under test (issue #14: restart to rejoin <= 1.5 s): an already-imported standby per
worker takes over the killed one (geotrain.run.standby). ``--cold-restart`` measures a fresh process instead."""
RUN_TIMEOUT_S = 240


# ======================================================================================
# torchft worker (runs inside the torchft venv: stdlib, torch, numpy and torchft only)


def _import_workload():
    """geotrain's worker/model.py and worker/data.py, imported by path without geotrain/__init__.py
    (which pulls in pydantic, grpc, ...). geotrain/errors.py, which data.py uses, has no imports."""
    import importlib
    import types

    pkg = types.ModuleType("geotrain")
    pkg.__path__ = [str(REPO / "geotrain")]
    sys.modules["geotrain"] = pkg
    sub = types.ModuleType("geotrain.worker")
    sub.__path__ = [str(REPO / "worker")]
    sys.modules["geotrain.worker"] = sub
    pkg.worker = sub
    return importlib.import_module("geotrain.worker.model"), importlib.import_module("geotrain.worker.data")


def torchft_worker(cfg: dict) -> int:
    from datetime import timedelta

    import torch

    torch.set_num_threads(1)
    gpt, data = _import_workload()
    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo

    log = open(cfg["log"], "a", buffering=1)
    pid = os.getpid()

    def emit(event: str, **fields) -> None:
        log.write(json.dumps({"t": time.time(), "e": event, "pid": pid, **fields}) + "\n")

    emit("start")
    m, tr = cfg["model"], cfg["training"]
    H, rounds = tr["inner_steps"], tr["rounds"]
    corpus = data.TextCorpus.load(data.DataSpec(**cfg["data"]))  # as geotrain/worker/main.py does
    model = gpt.build_model(gpt.GPTConfig(**m), seed=cfg["seed"])
    inner = torch.optim.AdamW(model.parameters(), lr=tr["inner_lr"], betas=tuple(tr["betas"]),
                              weight_decay=tr["weight_decay"])
    outer = torch.optim.SGD(model.parameters(), lr=tr["outer_lr"], momentum=tr["outer_momentum"],
                            nesterov=tr["nesterov"])
    sampler = data.BatchSampler(corpus.train, tr["batch_size"], m["block_size"], seed=cfg["data_seed"])
    held_out = data.eval_batches(corpus.eval, tr["batch_size"], m["block_size"], tr["eval_batches"]) \
        if cfg["evaluator"] else []

    def state_dict():
        return {"model": model.state_dict(), "inner": inner.state_dict()}

    def load_state_dict(sd):
        model.load_state_dict(sd["model"])
        inner.load_state_dict(sd["inner"])

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    manager = Manager(pg=ProcessGroupGloo(timeout=timedelta(seconds=60)), load_state_dict=load_state_dict,
                      state_dict=state_dict, min_replica_size=2, use_async_quorum=False,
                      replica_id=f"replica_{cfg['replica']}", store_addr="127.0.0.1", store_port=store.port,
                      rank=0, world_size=1, lighthouse_addr=cfg["lighthouse"], hostname="127.0.0.1",
                      init_sync=False,  # both replicas build the same weights from the same seed
                      timeout=timedelta(seconds=60), quorum_timeout=timedelta(seconds=300),
                      connect_timeout=timedelta(seconds=30))

    # -- instrumentation: wrap the sync's parts (instance attributes shadow the methods) --
    cur: dict = {}
    orig_quorum, orig_commit, orig_heal = manager.start_quorum, manager.should_commit, manager._apply_pending_state_dict

    def start_quorum(*a, **k):
        t0 = time.perf_counter()
        try:
            return orig_quorum(*a, **k)
        finally:
            cur["quorum_s"] = time.perf_counter() - t0

    def should_commit(*a, **k):
        t0 = time.perf_counter()
        ok = orig_commit(*a, **k)
        cur["commit_rpc_s"], cur["committed"] = time.perf_counter() - t0, bool(ok)
        return ok

    def heal():
        orig_heal()
        emit("healed", step=manager.current_step())

    manager.start_quorum, manager.should_commit, manager._apply_pending_state_dict = start_quorum, should_commit, heal

    diloco = DiLoCo(manager, [model], inner, outer, sync_every=H, backup_device=torch.device("cpu"), pin_memory=False)
    orig_post = diloco._step_post_hook

    def post_hook(opt, args, kwargs):
        syncing = diloco._local_step + 1 == diloco._sync_every
        t0 = time.perf_counter()
        orig_post(opt, args, kwargs)
        if syncing:
            seconds = time.perf_counter() - t0
            committed = cur.pop("committed", None)
            # the round this sync committed (a replica that healed in its quorum jumped to the healthy one's step)
            rnd = manager.current_step() - 1 if committed else manager.current_step()
            emit("sync", round=rnd, seconds=seconds, quorum_s=cur.pop("quorum_s", None),
                 commit_rpc_s=cur.pop("commit_rpc_s", None), committed=committed,
                 participants=manager.num_participants())

    diloco._step_post_hook = post_hook  # registered on the optimizer in __enter__

    def evaluate(rnd: int) -> None:
        t0 = time.perf_counter()
        loss = data.evaluate(model, held_out)
        emit("eval", round=rnd, loss=loss, seconds=time.perf_counter() - t0)

    with diloco:
        if cfg["evaluator"] and manager.current_step() == 0:
            evaluate(0)
        while manager.current_step() < rounds:
            x, y = sampler.next_batch()
            _, loss = model(x, y)
            loss.backward()
            before = manager.current_step()
            inner.step()  # every H-th step DiLoCo's post-hook syncs inside this call
            inner.zero_grad(set_to_none=True)
            emit("step", round=before, gstep=manager.current_step() * H + diloco._local_step, loss=loss.item())
            if cfg["evaluator"] and manager.current_step() != before:
                evaluate(manager.current_step())
    emit("done", step=manager.current_step())
    log.close()
    os._exit(0)  # skip gloo / manager teardown (the other replica may already be gone)


# ======================================================================================
# the driver (runs in geotrain's venv)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n    ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except FileNotFoundError:
        return "(no output)"


def ensure_venv() -> tuple[dict | None, str | None]:
    """The torchft venv: (info, None), or (None, why not)."""
    try:
        return _ensure_venv()
    except Exception as exc:  # noqa: BLE001 - any reason it cannot be made is the answer
        return None, f"could not make the torchft venv at {VENV}: {type(exc).__name__}: {exc}"


def _ensure_venv() -> tuple[dict | None, str | None]:
    py = VENV / "bin" / "python"
    check = ("import json, importlib.metadata as md, torch, numpy, torchft.local_sgd, torchft.manager; "
             "print(json.dumps({'torchft': md.version('torchft'), 'torch': torch.__version__, "
             "'numpy': numpy.__version__}))")
    t0 = time.time()
    installed = False
    for attempt in range(2):
        if py.exists():
            r = subprocess.run([str(py), "-W", "ignore", "-c", check], capture_output=True, text=True)
            if r.returncode == 0:
                info = json.loads(r.stdout.strip().splitlines()[-1])
                info.update(venv=str(VENV), install_seconds=round(time.time() - t0, 1) if installed else 0.0)
                return info, None
            if attempt:
                return None, f"torchft venv at {VENV} does not import: {r.stderr.strip().splitlines()[-1:]}"
        import numpy

        print(f"creating {VENV} (pip install torch==2.13.0 torchft numpy=={numpy.__version__}) ...", flush=True)
        base = getattr(sys, "_base_executable", None) or sys.executable
        VENV.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([base, "-m", "venv", str(VENV)], capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"python -m venv {VENV} failed: {r.stderr.strip()[-500:]}"
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", "torchft",
                            f"numpy=={numpy.__version__}"], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            err = "\n".join(l for l in r.stderr.splitlines() if "WARNING: Location" not in l)
            return None, f"pip install torch==2.13.0 torchft failed (exit {r.returncode}): {err.strip()[-800:]}"
        installed = True
    return None, "unreachable"


def workload() -> dict:
    """The demo topology's recipe (with the overrides used for geotrain), for the torchft workers."""
    from geotrain.config.topology import load_topology
    from geotrain.worker.main import worker_seed

    topo = load_topology(TOPOLOGY, ["sites[0].workers=1", "sites[1].workers=1", *LOOPBACK_LINKS, *RECIPE])
    tr, m, d = topo.training, topo.model, topo.data
    return {
        "topo": topo,
        "seed": topo.seed,
        "sites": [s.name for s in topo.sites],
        "data_seeds": [worker_seed(topo.seed, s.name, 0) for s in topo.sites],
        "model": {"block_size": m.block_size, "n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd},
        "data": {"source": d.source, "paths": list(d.paths), "max_bytes": d.max_bytes, "eval_fraction": d.eval_fraction},
        "training": {"inner_steps": tr.inner_steps, "rounds": tr.rounds, "batch_size": tr.batch_size,
                     "eval_batches": tr.eval_batches, "inner_lr": tr.inner_optimizer.lr,
                     "betas": list(tr.inner_optimizer.betas), "weight_decay": tr.inner_optimizer.weight_decay,
                     "outer_lr": tr.outer_optimizer.lr, "outer_momentum": tr.outer_optimizer.momentum,
                     "nesterov": tr.outer_optimizer.nesterov},
    }


# ---- geotrain ----


def run_geotrain(rounds: int, kill_step: int | None, work: Path, standby: bool = True) -> dict:
    from geotrain.events import EventTail, read_events

    run_dir = work / ("geotrain-fault" if kill_step else "geotrain")
    argv = [sys.executable, "-m", "geotrain.cli", "launch", str(TOPOLOGY), "--run-dir", str(run_dir), "--quiet"]
    for o in ("sites[0].workers=1", "sites[1].workers=1", *LOOPBACK_LINKS, *RECIPE, *(STANDBY if standby else ()),
              f"training.rounds={rounds}"):
        argv += ["--set", o]
    out = open(work / f"{run_dir.name}.out", "w")
    load = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    killed = None
    tail = EventTail(run_dir / "metrics.jsonl")
    pid = None
    victim = "worker eu-west/0"
    try:
        while proc.poll() is None:
            if time.time() - t0 > RUN_TIMEOUT_S:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
                raise RuntimeError(f"geotrain run did not finish within {RUN_TIMEOUT_S}s")
            for e in tail.read() if kill_step is not None and killed is None else ():
                if e["event"] == "process_started" and e.get("name") == victim:
                    pid = e["pid"]
                elif e["event"] == "inner_step" and e.get("site") == "eu-west" and e["step"] >= kill_step and pid:
                    os.kill(pid, signal.SIGKILL)
                    killed = {"t": time.time(), "pid": pid, "at_step": e["step"]}
                    break
            time.sleep(0.05)
    finally:
        out.close()
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"geotrain launch exited {proc.returncode}:\n    {_tail(work / f'{run_dir.name}.out')}")
    summary = json.loads((run_dir / "summary.json").read_text())
    events = read_events(run_dir / "metrics.jsonl")
    return {"summary": summary, "events": events, "wall": wall, "killed": killed, "run_dir": str(run_dir),
            "loadavg": load}


def geotrain_rounds(events: list[dict]) -> dict[int, dict]:
    """Per round: each site's merge seconds and end time, and the commit (for a breakdown)."""
    rounds: dict[int, dict] = {}
    for e in events:
        if e["event"] == "merge":
            r = rounds.setdefault(e["round"], {"syncs": {}})
            r["syncs"][e["site"]] = {"seconds": e["seconds"], "end": e["t"], "start": e["t"] - e["seconds"]}
        elif e["event"] == "commit":
            rounds.setdefault(e["round"], {"syncs": {}})["commit"] = e
    return rounds


def geotrain_breakdown(rounds: dict[int, dict]) -> dict:
    """For the last arriver of each round: upload (its start -> commit start), commit (mean, outer step,
    state persisted to disk, run state put to etcd: the commit event's apply_s), download (commit -> its end)."""
    up, apply, down = [], [], []
    for r in rounds.values():
        c, s = r.get("commit"), r["syncs"]
        if not c or len(s) < 2:
            continue
        last = max(s.values(), key=lambda x: x["start"])
        t_commit_start = c["t"] - c["apply_s"]
        up.append(t_commit_start - last["start"])
        apply.append(c["apply_s"])
        down.append(last["end"] - c["t"])
    med = lambda xs: round(statistics.median(xs), 6) if xs else None  # noqa: E731
    return {"upload_s": med(up), "commit_s": med(apply), "download_s": med(down)}


# ---- torchft ----


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchft(work_cfg: dict, rounds: int, kill_step: int | None, work: Path) -> dict:
    from geotrain.events import read_events  # the torchft replicas write JSONL logs too

    py = VENV / "bin" / "python"
    tag = "torchft-fault" if kill_step else "torchft"
    d = work / tag
    d.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RUST_LOG="warn")
    env.pop("PYTHONPATH", None)
    load = os.getloadavg()[0]
    t0 = time.time()
    lh_out = open(d / "lighthouse.log", "w")
    lighthouse = subprocess.Popen([str(VENV / "bin" / "torchft_lighthouse"), "--min_replicas", "2",
                                   "--bind", f"127.0.0.1:{port}"], stdout=lh_out, stderr=subprocess.STDOUT, env=env)
    procs: dict[int, subprocess.Popen] = {}
    outs = []

    def start(i: int) -> None:
        cfg = {"replica": i, "site": work_cfg["sites"][i], "seed": work_cfg["seed"], "data_seed": work_cfg["data_seeds"][i],
               "model": work_cfg["model"], "data": work_cfg["data"],
               "training": dict(work_cfg["training"], rounds=rounds), "evaluator": i == 0,
               "lighthouse": f"http://127.0.0.1:{port}", "log": str(d / f"replica{i}.jsonl")}
        f = open(d / f"replica{i}.out", "a")
        outs.append(f)
        procs[i] = subprocess.Popen([str(py), "-W", "ignore", str(Path(__file__).resolve()), "--torchft-worker",
                                     json.dumps(cfg)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)

    killed = restarted = None
    try:
        time.sleep(0.2)
        if lighthouse.poll() is not None:
            raise RuntimeError(f"torchft_lighthouse exited {lighthouse.returncode}:\n    {_tail(d / 'lighthouse.log')}")
        start(0)
        start(1)
        done = set()
        while len(done) < 2:
            if time.time() - t0 > RUN_TIMEOUT_S:
                raise RuntimeError(f"torchft run did not finish within {RUN_TIMEOUT_S}s; replica logs:\n    "
                                   + _tail(d / "replica0.out") + "\n    " + _tail(d / "replica1.out"))
            for i, p in procs.items():
                rc = p.poll()
                if rc is None or i in done:
                    continue
                if rc == 0:
                    done.add(i)
                elif killed and i == 1 and restarted is None:
                    start(1)  # the restart policy: at once (geotrain's launcher polls every 0.2 s too)
                    restarted = {"t": time.time(), "pid": procs[1].pid}
                else:
                    raise RuntimeError(f"torchft replica {i} exited {rc}:\n    {_tail(d / f'replica{i}.out')}")
            if kill_step is not None and killed is None:
                steps = [e for e in read_events(d / "replica1.jsonl") if e["e"] == "step"]
                if steps and steps[-1]["gstep"] >= kill_step:
                    os.kill(procs[1].pid, signal.SIGKILL)
                    killed = {"t": time.time(), "pid": procs[1].pid, "at_step": steps[-1]["gstep"]}
                    time.sleep(0.2)
                    continue
            time.sleep(0.05 if kill_step is not None and killed is None else 0.2)
        wall = time.time() - t0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        lighthouse.send_signal(signal.SIGTERM)
        try:
            lighthouse.wait(10)
        except subprocess.TimeoutExpired:
            lighthouse.kill()
        lh_out.close()
        for f in outs:
            f.close()
    logs = {i: read_events(d / f"replica{i}.jsonl") for i in (0, 1)}
    return {"logs": logs, "wall": wall, "killed": killed, "restarted": restarted, "dir": str(d), "loadavg": load,
            "t0": t0}


def torchft_rounds(logs: dict[int, list[dict]], sites: list[str]) -> dict[int, dict]:
    rounds: dict[int, dict] = {}
    for i, evs in logs.items():
        for e in evs:
            if e["e"] == "sync" and e["committed"]:
                r = rounds.setdefault(e["round"], {"syncs": {}})
                r["syncs"][sites[i]] = {"seconds": e["seconds"], "end": e["t"], "start": e["t"] - e["seconds"],
                                        "quorum_s": e["quorum_s"], "commit_rpc_s": e["commit_rpc_s"],
                                        "participants": e["participants"], "pid": e["pid"]}
    return rounds


def torchft_breakdown(rounds: dict[int, dict]) -> dict:
    q, c, rest = [], [], []
    for r in rounds.values():
        s = r["syncs"]
        if len(s) < 2:
            continue
        last = max(s.values(), key=lambda x: x["start"])
        q.append(last["quorum_s"])
        c.append(last["commit_rpc_s"])
        rest.append(last["seconds"] - last["quorum_s"] - last["commit_rpc_s"])
    med = lambda xs: round(statistics.median(xs), 6) if xs else None  # noqa: E731
    return {"quorum_s": med(q), "allreduce_and_outer_step_s": med(rest), "should_commit_s": med(c)}


# ---- shared analysis ----


def sync_stats(rounds: dict[int, dict]) -> dict:
    """Per round: the last arriver's sync seconds (pure protocol cost) and the mean over sites."""
    last, mean = [], []
    for r in sorted(rounds):
        s = rounds[r]["syncs"]
        if len(s) < 2:
            continue
        last.append(max(s.values(), key=lambda x: x["start"])["seconds"])
        mean.append(statistics.mean(x["seconds"] for x in s.values()))
    return {"last_arriver_median_s": round(statistics.median(last), 6) if last else None,
            "last_arriver_per_round_s": [round(x, 6) for x in last],
            "mean_over_sites_median_s": round(statistics.median(mean), 6) if mean else None,
            "total_mean_over_sites_s": round(sum(mean), 6)}


def step_interval(steps: list[dict], key: str) -> float | None:
    """Median time between consecutive inner steps of one process (compute speed under the box's load)."""
    by: dict = {}
    for e in steps:
        by.setdefault(e[key], []).append(e["t"])
    d = [b - a for ts in by.values() for a, b in zip(ts, ts[1:])]
    return round(statistics.median(d), 6) if d else None


def span(step_times: list[float], rounds: dict[int, dict]) -> float:
    """First inner step logged -> last sync finished (the training loop, without process start-up)."""
    ends = [x["end"] for r in rounds.values() for x in r["syncs"].values()]
    return max(ends) - min(step_times)


def geotrain_numbers(res: dict, H: int, rounds_n: int, survivor: str, victim: str) -> dict:
    ev = res["events"]
    rounds = geotrain_rounds(ev)
    steps = [e for e in ev if e["event"] == "inner_step"]
    evals = sorted((e for e in ev if e["event"] == "eval"), key=lambda e: (e["step"], e["t"]))
    started = min(e["t"] for e in ev if e["event"] == "run_started")
    out = {"wall_s": res["summary"]["wall_seconds"], "span_s": span([e["t"] for e in steps], rounds),
           "startup_s": round(min(e["t"] for e in steps) - started, 3),
           "sync": sync_stats(rounds), "breakdown": geotrain_breakdown(rounds),
           "final_eval_loss": evals[-1]["loss"] if evals else None,
           "initial_eval_loss": evals[0]["loss"] if evals else None,
           "step_interval_median_s": step_interval(steps, "proc"), "loadavg_at_start": res["loadavg"],
           "checkpoint_stall_s": res["summary"].get("checkpoint_stall_seconds"), "run_dir": res["run_dir"]}
    k = res["killed"]
    if k:
        t_kill = k["t"]
        surv = sorted((e for e in ev if e["event"] == "merge" and e["site"] == survivor), key=lambda e: e["t"])
        blocked = [e["seconds"] for e in surv if e["t"] - e["seconds"] >= t_kill - 5 and e["t"] > t_kill]
        victim_steps = [e for e in steps if e["site"] == victim]
        before = [e for e in victim_steps if e["t"] <= t_kill]
        merged_before = [e for e in ev if e["event"] == "merge" and e["site"] == victim and e["t"] <= t_kill]
        last_merged = merged_before[-1]["step"] if merged_before else 0
        commits_after = sorted((e for e in ev if e["event"] == "commit" and e["t"] > t_kill), key=lambda e: e["t"])
        both = next((c for c in commits_after if victim in c["sites"]), None)
        commits = [e for e in ev if e["event"] == "commit"]
        respawn = [e["t"] for e in ev if e["event"] == "process_started" and e.get("name") == "worker " + victim + "/0"
                   and e["t"] > t_kill]
        after = [e["t"] for e in victim_steps if respawn and e["t"] > respawn[0]]
        joined = [e for e in ev if e["event"] == "site_joined" and e["site"] == victim
                  and respawn and e["t"] > respawn[0]]
        took_over = [e for e in ev if e["event"] == "process_started" and e.get("name") == "worker " + victim + "/0"
                     and e["t"] > t_kill and e.get("standby")]
        out["fault"] = {
            "restart_to_first_step_s": round(after[0] - respawn[0], 3) if after else None,
            "restart_to_join_s": round(joined[0]["t"] - respawn[0], 3) if joined else None,
            "join_decision": joined[0].get("decision") if joined else None,
            "warm_standby_took_over": bool(took_over),
            "killed_at_step": before[-1]["step"] if before else None,
            "survivor_blocked_s": round(max(blocked), 3) if blocked else None,
            "recovery_s": round(both["t"] - t_kill, 3) if both else None,
            "steps_lost_at_kill": (before[-1]["step"] - last_merged) if before else None,
            "victim_steps_executed": len(victim_steps),
            "victim_steps_wasted": len(victim_steps) - H * sum(1 for c in commits if victim in c["sites"]),
            "rounds_without_victim_update": sum(1 for c in commits if victim not in c["sites"]),
            "launcher_recovery_s": res["summary"].get("recovery_seconds"),
            "rounds_lost_summary": res["summary"].get("rounds_lost"),
        }
    return out


def torchft_numbers(res: dict, sites: list[str], H: int, rounds_n: int) -> dict:
    logs = res["logs"]
    rounds = torchft_rounds(logs, sites)
    steps = [e for evs in logs.values() for e in evs if e["e"] == "step"]
    evals = [e for e in logs[0] if e["e"] == "eval"]
    out = {"wall_s": round(res["wall"], 3), "span_s": span([e["t"] for e in steps], rounds),
           "startup_s": round(min(e["t"] for e in steps) - res["t0"], 3),
           "sync": sync_stats(rounds), "breakdown": torchft_breakdown(rounds),
           "final_eval_loss": evals[-1]["loss"] if evals else None,
           "initial_eval_loss": evals[0]["loss"] if evals else None,
           "step_interval_median_s": step_interval(steps, "pid"), "loadavg_at_start": res["loadavg"],
           "uncommitted_syncs": sum(1 for evs in logs.values() for e in evs if e["e"] == "sync" and not e["committed"]),
           "dir": res["dir"]}
    k = res["killed"]
    if k:
        t_kill = k["t"]
        surv = [e for e in logs[0] if e["e"] == "sync"]
        blocked = [e["seconds"] for e in surv if e["t"] > t_kill and e["t"] - e["seconds"] >= t_kill - 5]
        v = logs[1]
        vsteps = [e for e in v if e["e"] == "step"]
        before = [e for e in vsteps if e["pid"] == k["pid"]]
        synced = [e for e in v if e["e"] == "sync" and e["pid"] == k["pid"] and e["committed"]]
        last_merged = (synced[-1]["round"] + 1) * H if synced else 0
        new = [e for e in v if e["pid"] != k["pid"]]
        healed = next((e for e in new if e["e"] == "healed"), None)
        # steps the restarted replica ran before its weights were overwritten by healing, the step
        # during which it healed included (that step's pseudo-gradient is computed after the heal)
        pre_heal = 0
        if healed:
            for e in new:
                if e["e"] == "step":
                    pre_heal += 1
                    if e["t"] >= healed["t"]:
                        break
        first_sync = next((e for e in new if e["e"] == "sync" and e["committed"]), None)
        # a round where the restarted replica healed at the quorum: it sent the healthy replica's
        # pseudo-gradient (it had just loaded that replica's weights), so the round had one real update
        heal_round = first_sync["round"] if (first_sync and healed) else None
        solo = sum(1 for r in rounds.values() if any(x["participants"] < 2 for x in r["syncs"].values()))
        without = solo + (1 if heal_round is not None else 0)
        out["fault"] = {
            "killed_at_step": before[-1]["gstep"] if before else None,
            "survivor_blocked_s": round(max(blocked), 3) if blocked else None,
            "recovery_s": round(first_sync["t"] - t_kill, 3) if first_sync else None,
            "restart_to_first_step_s": round(next(e["t"] for e in new if e["e"] == "step") - res["restarted"]["t"], 3)
            if res["restarted"] and any(e["e"] == "step" for e in new) else None,
            "steps_lost_at_kill": (before[-1]["gstep"] - last_merged) if before else None,
            "steps_discarded_by_heal": pre_heal,
            "victim_steps_executed": len(vsteps),
            "victim_steps_wasted": len(vsteps) - H * (rounds_n - without),
            "rounds_without_victim_update": without,
            "healed_at_round": heal_round,
        }
    return out


def ratio(a, b):
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def fmt(x, spec=".4g"):
    return "-" if x is None else format(x, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--kill-step", type=int, default=45, help="inner step of the second site at which it is SIGKILLed")
    p.add_argument("--no-fault", action="store_true", help="skip the kill-and-restart runs")
    p.add_argument("--cold-restart", action="store_true",
                   help="geotrain restarts the killed worker as a fresh process (default: its warm standby)")
    p.add_argument("--torchft-worker", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torchft_worker:
        return torchft_worker(json.loads(args.torchft_worker))

    sys.path.insert(0, str(HERE))
    from _common import save

    t_all = time.time()
    wl = workload()
    H, sites = wl["training"]["inner_steps"], wl["sites"]
    survivor, victim = sites[0], sites[1]
    work = Path(tempfile.mkdtemp(prefix="geotrain-vs-torchft-"))
    info, why = ensure_venv()
    if why:
        print(f"torchft: NOT RUN: {why}")
    else:
        print(f"torchft {info['torchft']} (torch {info['torch']}) in {info['venv']}")

    def attempt(fn, label):
        try:
            return fn(), None
        except Exception as exc:  # noqa: BLE001 - report and go on with the other side
            print(f"{label}: FAILED: {exc}")
            return None, f"{type(exc).__name__}: {exc}"

    g, g_err = attempt(lambda: geotrain_numbers(
        run_geotrain(args.rounds, None, work, not args.cold_restart), H, args.rounds, survivor, victim),
        "geotrain clean run")
    t, t_err = (None, why) if why else attempt(
        lambda: torchft_numbers(run_torchft(wl, args.rounds, None, work), sites, H, args.rounds), "torchft clean run")
    gf = tf = None
    gf_err = tf_err = None
    if not args.no_fault:
        gf, gf_err = attempt(lambda: geotrain_numbers(
            run_geotrain(args.rounds, args.kill_step, work, not args.cold_restart), H, args.rounds, survivor, victim),
            "geotrain fault run")
        tf, tf_err = (None, why) if why else attempt(
            lambda: torchft_numbers(run_torchft(wl, args.rounds, args.kill_step, work), sites, H, args.rounds),
            "torchft fault run")

    G = lambda d, *ks: None if d is None else _dig(d, ks)  # noqa: E731
    print(f"\n2 sites x 1 worker, H={H}, {args.rounds} rounds ({args.rounds * H} inner steps per site), loopback; "
          f"geotrain links 100gbit/0ms; one run each")
    print(f"{'clean run':44} {'geotrain':>10} {'torchft':>10} {'g/t':>7}")
    rows = [
        ("wall seconds, end to end", "wall_s"),
        ("start-up s (launch -> first inner step)", "startup_s"),
        ("training span s (first step -> last sync)", "span_s"),
        ("inner step interval s (median)", "step_interval_median_s"),
        ("sync s/round, last arriver (median)", "sync", "last_arriver_median_s"),
        ("sync s/round, mean over sites (median)", "sync", "mean_over_sites_median_s"),
        ("final eval loss", "final_eval_loss"),
        ("1-min load average when the run started", "loadavg_at_start"),
    ]
    table = {}
    for label, *ks in rows:
        a, b = G(g, *ks), G(t, *ks)
        table[label] = {"geotrain": a, "torchft": b, "ratio": ratio(a, b)}
        print(f"{label:44} {fmt(a):>10} {fmt(b):>10} {fmt(ratio(a, b), '.3f'):>7}")
    if g:
        b = g["breakdown"]
        print(f"  geotrain last arriver: upload {fmt(b['upload_s'])} s, commit (mean + outer step + persist to disk "
              f"+ etcd put) {fmt(b['commit_s'])} s, download {fmt(b['download_s'])} s; "
              f"initial eval loss {fmt(g['initial_eval_loss'])}")
    if t:
        b = t["breakdown"]
        print(f"  torchft last arriver: start_quorum {fmt(b['quorum_s'])} s, allreduce + outer step "
              f"{fmt(b['allreduce_and_outer_step_s'])} s, should_commit {fmt(b['should_commit_s'])} s; "
              f"initial eval loss {fmt(t['initial_eval_loss'])}; uncommitted syncs {t['uncommitted_syncs']}")
    if not args.no_fault:
        print(f"\nkill -9 of the second site's worker at its inner step {args.kill_step}, restarted")
        print(f"{'fault run':44} {'geotrain':>10} {'torchft':>10} {'g/t':>7}")
        frows = [
            ("killed at inner step", "fault", "killed_at_step"),
            ("seconds the surviving site was blocked", "fault", "survivor_blocked_s"),
            ("seconds kill -> first commit with it again", "fault", "recovery_s"),
            ("seconds restart -> its first inner step", "fault", "restart_to_first_step_s"),
            ("inner steps lost at the kill", "fault", "steps_lost_at_kill"),
            ("its inner steps wasted (in no commit)", "fault", "victim_steps_wasted"),
            ("rounds without its own update", "fault", "rounds_without_victim_update"),
            ("wall seconds, end to end", "wall_s"),
            ("final eval loss", "final_eval_loss"),
        ]
        for label, *ks in frows:
            a, b = G(gf, *ks), G(tf, *ks)
            table["fault: " + label] = {"geotrain": a, "torchft": b, "ratio": ratio(a, b)}
            print(f"{label:44} {fmt(a):>10} {fmt(b):>10} {fmt(ratio(a, b), '.3f'):>7}")
        for name, f, c in (("geotrain", gf, g), ("torchft", tf, t)):
            if f and c:
                print(f"  {name}: wall {f['wall_s'] - c['wall_s']:+.1f} s against its clean run; final eval loss "
                      f"{f['final_eval_loss'] / c['final_eval_loss']:.4f} x its clean run's")
        if gf and gf.get("fault"):
            x = gf["fault"]
            print(f"  geotrain: restart -> site_joined {fmt(x['restart_to_join_s'])} s ({x['join_decision']}); "
                  f"warm standby took over: {x['warm_standby_took_over']}")
        if tf and tf.get("fault"):
            print(f"  torchft: the restarted replica trained {tf['fault']['steps_discarded_by_heal']} steps from the "
                  f"initial weights before its first quorum healed it (weights overwritten: lost)")
    errors = {k: v for k, v in (("geotrain", g_err), ("torchft", t_err), ("geotrain_fault", gf_err),
                                ("torchft_fault", tf_err)) if v}
    path = save("torchft_side_by_side", {
        "rounds": args.rounds, "H": H, "kill_step": None if args.no_fault else args.kill_step,
        "torchft_env": info, "errors": errors, "table": table,
        "geotrain": g, "torchft": t, "geotrain_fault": gf, "torchft_fault": tf,
        "seconds": round(time.time() - t_all, 1)})
    print(f"\nwrote {path} ({time.time() - t_all:.0f} s)")
    return 0


def _dig(d, ks):
    for k in ks:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


if __name__ == "__main__":
    sys.exit(main())
