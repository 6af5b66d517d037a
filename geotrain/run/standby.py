"""A warm standby worker: a process that has paid for its imports before it is needed.

A restarted site used to spend most of its restart importing (torch, geotrain, pydantic: 3-4 s of a
4-5 s restart on this machine; then torch._dynamo, which its first optimizer imports: 1.5 s more)
while the run went on without it. The launcher keeps one standby per
worker of every site (``python -m geotrain.run.standby``): it imports what a worker imports, prints
``READY``, and waits on its stdin. When the site restarts, the launcher hands each standby a worker's
start (:func:`activation`: the environment, argv and working directory the worker would have been
spawned with, one JSON line) and the standby *becomes* that worker in the same process: environment
applied, then ``runpy`` runs ``-m MODULE`` or the script path, as ``python`` would. Its pid is the
worker's pid (the coordinator and etcd see it as any other worker). Its stdout and stderr are the
worker's log, chosen when the standby was spawned.

What a standby cannot take over (an entry that is not ``python -m MODULE`` or ``python SCRIPT`` of
this interpreter) is not given to it: the launcher spawns that worker fresh, as before
(:func:`can_take`). A standby whose stdin closes exits 0 without running anything.

Events: started with ``--events PATH --name NAME`` (as the launcher starts it), a standby writes
``standby_ready`` to the run's metrics.jsonl once it is warm (``seconds``: from its start; the launcher wrote
``standby_started`` when it spawned it), so that a run's history says when its standbys were importing
beside the training (they slow its steps on a machine with few cores: geotrain.sim.calibrate measures that).

Environment read at import time: the standby starts with the variables that decide how torch sets
itself up (``OMP_NUM_THREADS`` and the socket interfaces of gloo and NCCL, the same for every worker
of a launch), so what was imported early agrees with what the worker's environment says.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sys
from pathlib import Path

READY = "READY standby"
WARM_MODULES = ("torch", "geotrain.worker.main", "geotrain.sdk", "torch._dynamo", "geotrain.control.plane")
"""What a standby imports before it says READY: everything the built-in worker and an SDK script need.
``torch._dynamo`` is not imported by ``import torch`` but by the first optimizer a process builds
(``Optimizer.add_param_group`` is wrapped in ``torch._disable_dynamo``, which imports it, and sympy with it):
1.5 of the 2.5 s a standby took from its activation to its site's join on this machine (2026-12-03).
``geotrain.control.plane`` is the etcd client a worker registers with (0.13 s)."""
COMPILE_MODULES = ("torch._inductor.compile_fx",)
"""Also imported with ``--compile`` (the run's ``model.compile``): torch.compile's backend, ~1.3 s here. The
compile itself is the restarted worker's (faster from torch's on-disk cache)."""


def warm_up() -> None:
    """What a worker's first inner step pays for once per process, paid here: an optimizer built and
    stepped, a backward pass (autograd's engine), on a throwaway tensor."""
    import torch

    p = torch.zeros(8, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=1e-3)
    (p * p).sum().backward()
    opt.step()


def can_take(argv: list[str], python: str) -> bool:
    """May a standby of interpreter ``python`` become a worker started as ``argv``? Only a ``python`` of the
    same environment (the same bin folder: a venv's python and its base interpreter resolve to one binary
    but do not import the same packages), running ``-m MODULE`` or a script."""
    if len(argv) < 2:
        return False
    exe = shutil.which(argv[0])
    if exe is None or not Path(exe).name.startswith("python"):
        return False
    if os.path.dirname(os.path.abspath(exe)) != os.path.dirname(os.path.abspath(python)):
        return False
    if argv[1] == "-m":
        return len(argv) >= 3
    return not argv[1].startswith("-")


def activation(argv: list[str], env: dict[str, str], cwd: str | None) -> bytes:
    """The line that turns a standby into the worker ``argv`` with ``env`` in ``cwd``."""
    return (json.dumps({"argv": list(argv), "env": dict(env), "cwd": cwd}) + "\n").encode()


def become(order: dict) -> None:
    """Run the worker ``order`` describes, in this process (returns or exits as the worker does)."""
    os.environ.clear()
    os.environ.update(order["env"])
    if order.get("cwd"):
        os.chdir(order["cwd"])
    argv = order["argv"]
    if argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]
        sys.modules.pop(argv[2], None)  # imported warm: run afresh as __main__, as `python -m` would
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        script = str(Path(argv[1]).resolve())
        sys.argv = [script, *argv[2:]]
        sys.path.insert(0, str(Path(script).parent))
        runpy.run_path(script, run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import importlib
    import time

    started = time.time()
    ap = argparse.ArgumentParser(prog="python -m geotrain.run.standby")
    ap.add_argument("--events", help="the run's metrics.jsonl: standby_ready is written there once warm")
    ap.add_argument("--name", default="", help="the worker this standby stands by for (e.g. 'worker us-east/0')")
    ap.add_argument("--compile", action="store_true", help="the run compiles its model: import torch.compile's too")
    args = ap.parse_args(argv)
    for name in WARM_MODULES + (COMPILE_MODULES if args.compile else ()):
        importlib.import_module(name)
    warm_up()
    if args.events:
        from geotrain.events import EventLog

        log = EventLog(args.events, proc="standby")
        log.emit("standby_ready", name=args.name, pid=os.getpid(), seconds=round(time.time() - started, 6))
        log.close()
    print(READY, flush=True)
    line = sys.stdin.readline()
    if not line.strip():  # the launcher let it go unused
        return 0
    devnull = os.open(os.devnull, os.O_RDONLY)  # the worker's stdin is /dev/null, as a fresh one's is
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(0, closefd=False)
    become(json.loads(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
