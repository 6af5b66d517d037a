"""The `geotrain` command.

    geotrain launch TOPOLOGY [--set path=value ...] [--run-dir DIR] [--script -- CMD ...]
    geotrain validate TOPOLOGY [--set path=value ...]
    geotrain resume RUN_DIR
    geotrain checkpoint ls RUN_DIR | verify PATH
    geotrain chaos RUN_DIR KIND [TARGET] [--duration 10s ...]
    geotrain report RUN_DIR [RUN_DIR ...] [--out DIR]
    geotrain check RUN_DIR [--twin RUN_DIR]
    geotrain sweep TOPOLOGY --grid path=v1,v2 ... [--out DIR]
    geotrain compose TOPOLOGY -o DIR
    geotrain k8s render TOPOLOGY -o DIR        (Kubernetes objects; docs/deploy.md)
    geotrain slurm render TOPOLOGY -o DIR      (Slurm batch scripts; docs/deploy.md)
    geotrain simulate TOPOLOGY [--calibrate RUN_DIR] [--compare RUN_DIR]   (docs/simulator.md)
    geotrain coordinator TOPOLOGY ...      (one part on its own host; see docs/architecture.md)
    geotrain site NAME TOPOLOGY ...         (one site's workers on its own host)
    geotrain link ...                       (one WAN link emulator process)

Exit codes: 0 success; 1 a run failed (the reason is printed); 2 bad input (topology, flags);
130 interrupted. A mistake by the user never prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from geotrain.errors import GeotrainError, RunFailed, RunInterrupted, TopologyError


def _add_topology_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("topology", type=Path, help="the topology file (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a field, e.g. --set training.inner_steps=50 --set sites[0].workers=4")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geotrain", description="Train one model across several datacenters (DiLoCo over emulated WAN links).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lp = sub.add_parser("launch", help="run a topology end to end on this machine")
    _add_topology_args(lp)
    lp.add_argument("--run-dir", type=Path, default=None, help="run directory (default: runs/<name>-<time>)")
    lp.add_argument("--runs-root", type=Path, default=Path("runs"), help="where default run directories go")
    lp.add_argument("--script", nargs=argparse.REMAINDER, default=None,
                    help="run this command as every worker's entrypoint instead of the built-in trainer "
                         "(site, rank and coordinator come through GEOTRAIN_* variables); must be last")
    lp.add_argument("--quiet", action="store_true", help="no live progress")
    lp.add_argument("--backend", choices=["local", "slurm"], default="local",
                    help="local: every part on this machine (default); slurm: a job per site and one for the control "
                         "plane, watched, a failed site submitted again (the run directory must be shared by the nodes)")
    sg = lp.add_argument_group("--backend slurm")
    sg.add_argument("--partition", default=None)
    sg.add_argument("--account", default=None)
    sg.add_argument("--time", default=None, help="each job's time limit, e.g. 2:00:00")
    sg.add_argument("--geotrain", default=None, help="the geotrain command on the nodes (default: this one's)")
    sg.add_argument("--python", default=None, help="geotrain's Python on the control node (default: this one)")
    sg.add_argument("--port-base", type=int, default=7000,
                    help="coordinator P, etcd P+1 and P+2, the i-th site's link P+100+i, its nodes P+200+i (default %(default)s)")
    sg.add_argument("--linger", type=float, default=None, dest="linger_s",
                    help="seconds the coordinator serves after the last commit (default: its own)")

    vp = sub.add_parser("validate", help="check a topology file and print what it resolves to")
    _add_topology_args(vp)
    vp.add_argument("--json", action="store_true", help="print the validated topology as JSON")

    sub.add_parser("coordinator", help="run the coordinator on this host", add_help=False)
    sub.add_parser("link", help="run one WAN link emulator", add_help=False)
    sub.add_parser("site", help="run one site's worker group on this host", add_help=False)
    sub.add_parser("run-local", help="run a training script as one site in this process, to debug it", add_help=False)
    kp = sub.add_parser("certs", help="make a run's CA and certificates (mTLS), or show them")
    ksub = kp.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    ki = ksub.add_parser("init", help="write a CA and a certificate per part of a run of TOPOLOGY")
    _add_topology_args(ki)
    ki.add_argument("-o", "--out", type=Path, required=True, help="the directory to write (keys are 0600)")
    ki.add_argument("--hosts", default="", help="comma-separated extra names/addresses on every certificate "
                                                "(the machines the parts run on)")
    ki.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    ki.add_argument("--ca", type=Path, default=None, help="issue under this existing CA certificate (rotation) ...")
    ki.add_argument("--ca-key", type=Path, default=None, help="... and its key")
    ks = ksub.add_parser("show", help="list a certificate directory: names and expiry")
    ks.add_argument("dir", type=Path)
    rp = sub.add_parser("resume", help="continue a stopped run from its latest good checkpoint")
    rp.add_argument("run_dir", type=Path, help="the run directory of the stopped run")
    rp.add_argument("--quiet", action="store_true", help="no live progress")
    cp = sub.add_parser("checkpoint", help="list or verify checkpoints")
    csub = cp.add_subparsers(dest="checkpoint_command", required=True, metavar="ACTION")
    cl = csub.add_parser("ls", help="list the checkpoints of a run")
    cl.add_argument("run_dir", type=Path)
    cv = csub.add_parser("verify", help="verify a checkpoint (a round folder, one part, or every round of a run)")
    cv.add_argument("path", type=Path)
    xp = sub.add_parser("chaos", help="inject a fault into a running launch, live",
                        description="Inject one fault into the run that `geotrain launch` is running in RUN_DIR. "
                                    "Examples: geotrain chaos RUN kill 'worker us-east/1'; "
                                    "geotrain chaos RUN partition 'link eu-west' --duration 10s; "
                                    "geotrain chaos RUN degrade 'link eu-west' --latency 200ms --duration 20s")
    xp.add_argument("run_dir", type=Path)
    xp.add_argument("kind", choices=["kill", "freeze", "partition", "degrade", "flap", "slow", "disk_full", "corrupt_checkpoint"])
    xp.add_argument("target", nargs="?", default="", help="'worker SITE/RANK', 'site SITE', coordinator, etcd, 'link SITE'")
    for opt in ("duration", "direction", "bandwidth", "latency", "jitter", "loss", "period", "factor"):
        xp.add_argument(f"--{opt}", default=None)
    sub.add_parser("report", help="write report.md and plots for one or more runs", add_help=False)
    sub.add_parser("sweep", help="run a topology over a grid of overrides and compare", add_help=False)
    sub.add_parser("simulate", help="simulate a topology's run in simulated time (calibrated from a real run)",
                   add_help=False)
    sub.add_parser("compose", help="render a Docker Compose deployment of a topology", add_help=False)
    sub.add_parser("k8s", help="render Kubernetes objects of a topology (kubectl apply -f DIR)", add_help=False)
    sub.add_parser("slurm", help="render Slurm batch scripts of a topology (a job per site)", add_help=False)
    sub.add_parser("check", help="check a run's recorded history against its invariants", add_help=False)
    return p


def cmd_validate(args) -> int:
    from geotrain.config.topology import load_topology

    topo = load_topology(args.topology, args.overrides)
    if args.json:
        print(json.dumps(topo.model_dump(mode="json"), indent=2))
        return 0
    from geotrain.worker.data import check_data_files  # the built-in trainer's data, readable now

    data_lines = check_data_files(topo)
    tr = topo.training
    print(f"{args.topology}: ok — run {topo.name!r}, {len(topo.sites)} sites "
          f"({', '.join(f'{s.name}×{s.workers}' for s in topo.sites)}), coordinator at {topo.coordinator.at}, "
          f"{tr.algorithm} H={tr.inner_steps} rounds={tr.rounds}")
    for line in data_lines:
        print(f"  {line}")
    for s in topo.sites:
        link = topo.link(s.name, topo.coordinator.at)
        if link:
            print(f"  link {s.name} <-> {topo.coordinator.at}: {link.bandwidth_mbps:g} Mbit/s, {link.latency_ms:g} ms one-way, "
                  f"jitter {link.jitter_ms:g} ms, loss {link.loss:g}")
        else:
            print(f"  {s.name}: same datacenter as the coordinator (no WAN link)")
    return 0


def cmd_launch(args) -> int:
    from geotrain.run.launch import LaunchPlan, launch, make_run_dir
    from geotrain.run.progress import make_progress
    from geotrain.config.topology import load_topology

    topo = load_topology(args.topology, args.overrides)
    if args.backend == "slurm":
        return cmd_launch_slurm(args, topo)
    if args.script is not None and not args.script:
        raise TopologyError("--script: give the command to run, e.g. --script python train.py")
    from geotrain.run.devices import check_cuda_sites

    check_cuda_sites(topo)  # a cuda site this machine cannot run: refused now, not crash-looping later
    if args.script is None:  # the built-in trainer's data: present now, not after its workers crash
        from geotrain.worker.data import check_data_files

        check_data_files(topo)
    run_dir = args.run_dir or make_run_dir(args.runs_root, topo.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = LaunchPlan(topo=topo, run_dir=run_dir.resolve(), script=args.script, quiet=args.quiet, cwd=os.getcwd())
    try:
        summary = launch(plan, progress_factory=None if args.quiet else make_progress)
    except RunFailed as exc:
        print(f"geotrain launch: run failed: {exc}", file=sys.stderr)
        print(run_dir)
        return 130 if isinstance(exc, RunInterrupted) else 1
    print(f"geotrain launch: {done_line(summary)}", file=sys.stderr)
    print(f"geotrain launch: workers' output is in {run_dir / 'logs'}/worker-<site>-<rank>.log" if args.script else
          f"geotrain launch: logs in {run_dir / 'logs'}", file=sys.stderr)
    print(run_dir)
    return 0


def cmd_launch_slurm(args, topo) -> int:
    from geotrain.run.launch import make_run_dir
    from geotrain.run.slurm import SlurmOptions
    from geotrain.run.slurm_launch import launch_on_slurm

    if args.script is not None:
        raise TopologyError("--backend slurm runs the built-in trainer only (no --script yet)")
    from geotrain.worker.data import check_data_files

    check_data_files(topo)
    run_dir = (args.run_dir or make_run_dir(args.runs_root, topo.name)).resolve()
    here = Path(sys.executable).parent / "geotrain"
    opts = SlurmOptions(run_dir=str(run_dir), deploy_dir=str(run_dir / "deploy"),
                        geotrain=args.geotrain or (str(here) if here.exists() else "geotrain"),
                        python=args.python or sys.executable, port_base=args.port_base, partition=args.partition,
                        account=args.account, time=args.time, linger_s=args.linger_s)
    try:
        summary = launch_on_slurm(topo, run_dir, opts)
    except RunFailed as exc:
        print(f"geotrain launch: run failed: {exc}", file=sys.stderr)
        print(run_dir)
        return 130 if isinstance(exc, RunInterrupted) else 1
    print(f"geotrain launch: {done_line(summary)}", file=sys.stderr)
    print(f"geotrain launch: jobs in {run_dir / 'slurm' / 'jobs.json'}, their output in {run_dir / 'slurm'}", file=sys.stderr)
    print(run_dir)
    return 0


def done_line(summary: dict) -> str:
    """The last line of a finished run: rounds, the eval where there was one, WAN bytes, time."""
    from geotrain.units import human_bytes

    parts = [f"{summary['rounds_completed']}/{summary['rounds_planned']} rounds"]
    first, last = summary.get("initial_eval_loss"), summary.get("final_eval_loss")
    name = summary.get("eval_metric") or "eval loss"
    if last is not None:
        parts.append(f"{name} {first:.4g} -> {last:.4g}" if first is not None else f"final {name} {last:.4g}")
    for name, m in sorted((summary.get("metrics") or {}).items())[:3]:
        if name.startswith("eval/"):  # shown above
            continue
        values = [v for v in m["sites"].values() if isinstance(v, (int, float))]
        if values:
            parts.append(f"{name} {sum(values) / len(values):.4g}")
    parts.append(f"WAN {human_bytes(summary['wan_bytes'])}")
    parts.append(f"{summary['wall_seconds']:.1f}s")
    return ", ".join(parts)


def _expected_parts(topo) -> list[str]:
    from geotrain.storage.checkpoint import COORDINATOR_PART

    return [COORDINATOR_PART] + [f"{s.name}.{r}" for s in topo.sites for r in range(s.world_size)]


def _run_topology(run_dir: Path):
    from geotrain.config.topology import load_any

    path = run_dir / "topology.json"
    if not path.exists():
        raise TopologyError(f"{run_dir}: not a geotrain run directory (no topology.json)")
    return load_any(str(path))


def cmd_resume(args) -> int:
    from geotrain.storage.checkpoint import latest_complete, verify_checkpoint
    from geotrain.run.launch import LaunchPlan, launch, read_launch_record
    from geotrain.run.progress import make_progress
    from geotrain.run.site import checkpoint_dir

    run_dir = args.run_dir.resolve()
    script, cwd = read_launch_record(run_dir)  # a script run resumes the same script, in the same folder
    topo = _run_topology(run_dir)
    info = latest_complete(checkpoint_dir(topo, run_dir), _expected_parts(topo))
    if info is None:
        raise RunFailed(f"{run_dir}: no complete, verified checkpoint to resume from (see `geotrain checkpoint ls {args.run_dir}`)")
    manifest = verify_checkpoint(info.path / "coordinator")
    if manifest["topology_sha256"] != topo.digest():
        raise RunFailed(f"{info.path}: written for another topology (sha256 {manifest['topology_sha256'][:12]}, "
                        f"this run's is {topo.digest()[:12]})")
    print(f"geotrain resume: continuing {topo.name} from round {info.round} ({info.path})"
          + (f" with {' '.join(script)}" if script else ""), file=sys.stderr)
    from geotrain.run.devices import check_cuda_sites

    check_cuda_sites(topo)
    plan = LaunchPlan(topo=topo, run_dir=run_dir, quiet=args.quiet, resume_round=info.round, script=script, cwd=cwd)
    try:
        summary = launch(plan, progress_factory=None if args.quiet else make_progress)
    except RunFailed as exc:
        print(f"geotrain resume: run failed: {exc}", file=sys.stderr)
        print(run_dir)
        return 130 if isinstance(exc, RunInterrupted) else 1
    print(f"geotrain resume: {done_line(summary)}", file=sys.stderr)
    print(run_dir)
    return 0


def cmd_checkpoint(args) -> int:
    from geotrain.storage.checkpoint import ROUND_RE, list_rounds, verify_checkpoint
    from geotrain.errors import CheckpointCorrupt
    from geotrain.run.site import checkpoint_dir

    if args.checkpoint_command == "ls":
        run_dir = args.run_dir.resolve()
        topo = _run_topology(run_dir)
        rounds = list_rounds(checkpoint_dir(topo, run_dir), _expected_parts(topo))
        if not rounds:
            print(f"{run_dir}: no checkpoints")
            return 0
        print(f"{'round':>6}  {'status':10}  {'parts':>5}  path")
        for r in rounds:
            status = "ok" if r.complete else "BAD"
            print(f"{r.round:>6}  {status:10}  {len(r.parts):>5}  {r.path}" + ("" if r.complete else f"\n        {r.problem}"))
        return 0
    path = args.path.resolve()
    if not path.exists():
        raise TopologyError(f"{path}: no such checkpoint")
    targets = [path]
    if (path / "checkpoints").is_dir():  # a run directory: every round
        targets = sorted(d for d in (path / "checkpoints").iterdir() if ROUND_RE.match(d.name))
    bad = 0
    for t in targets:
        try:
            verify_checkpoint(t)
            print(f"ok   {t}")
        except CheckpointCorrupt as exc:
            bad += 1
            print(f"BAD  {exc}")
    return 1 if bad else 0


def cmd_certs(args) -> int:
    from geotrain.security.pki import CertDir, init_certs

    if args.certs_command == "init":
        from geotrain.config.topology import load_topology

        topo = load_topology(args.topology, args.overrides)
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        certs = init_certs(args.out, topo.site_names, run=topo.name, hosts=[topo.coordinator.host, *hosts],
                           days=args.days, ca_cert=args.ca, ca_key=args.ca_key)
        print(f"geotrain certs: wrote {'a new CA and ' if args.ca is None else ''}{len(certs.names())} certificates "
              f"to {certs.path} ({', '.join(certs.names())}); give each part only ca.pem and its own pair",
              file=sys.stderr)
        print(certs.path)
        return 0
    from cryptography import x509

    certs = CertDir(args.dir)
    if not (args.dir / "ca.pem").is_file():
        raise TopologyError(f"{args.dir}: not a certificate directory (no ca.pem)")
    for name in ["ca", *certs.names()]:
        cert = x509.load_pem_x509_certificate((args.dir / f"{name}.pem").read_bytes())
        print(f"{name:24} expires {cert.not_valid_after_utc:%Y-%m-%d}  {cert.subject.rfc4514_string()}")
    return 0


def cmd_chaos(args) -> int:
    from geotrain.run.faults import request_live_fault
    from geotrain.config.topology import FaultSpec, fault_problem

    run_dir = args.run_dir.resolve()
    topo = _run_topology(run_dir)
    raw = {"kind": args.kind, "target": args.target, "at": "0s"}
    for opt in ("duration", "direction", "bandwidth", "latency", "jitter", "loss", "period", "factor"):
        if getattr(args, opt) is not None:
            raw[opt] = getattr(args, opt)
    try:
        spec = FaultSpec.model_validate(raw)
    except ValueError as exc:
        raise TopologyError(f"geotrain chaos: {str(exc).splitlines()[1] if len(str(exc).splitlines()) > 1 else exc}") from None
    problem = fault_problem(topo, spec)
    if problem:
        raise TopologyError(f"fault {problem.lstrip('.: ')}")
    path = request_live_fault(run_dir, raw)
    print(f"requested {args.kind} {args.target} ({path.name}); see fault_injected in {run_dir / 'metrics.jsonl'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Parts that run on their own host have their own argument parsers.
    if argv and argv[0] == "coordinator":
        from geotrain.orchestrator.main import main as coordinator_main

        return coordinator_main(argv[1:])
    if argv and argv[0] == "link":
        from geotrain.wan.link import main as link_main

        return link_main(argv[1:])
    if argv and argv[0] == "site":
        from geotrain.run.site import main as site_main

        return site_main(argv[1:])
    if argv and argv[0] == "run-local":
        from geotrain.run.local import main as local_main

        return local_main(argv[1:])
    if argv and argv[0] == "report":
        from geotrain.analysis.report import main as report_main

        return report_main(argv[1:])
    if argv and argv[0] == "simulate":
        from geotrain.sim.cli import main as simulate_main

        return simulate_main(argv[1:])
    if argv and argv[0] == "sweep":
        from geotrain.analysis.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv and argv[0] == "k8s":
        from geotrain.run.k8s import main as k8s_main

        return k8s_main(argv[1:])
    if argv and argv[0] == "slurm":
        from geotrain.run.slurm import main as slurm_main

        return slurm_main(argv[1:])
    if argv and argv[0] == "compose":
        from geotrain.run.compose import main as compose_main

        return compose_main(argv[1:])
    if argv and argv[0] == "check":
        from geotrain.analysis.check import main as check_main

        return check_main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "launch":
            return cmd_launch(args)
        if args.command == "resume":
            return cmd_resume(args)
        if args.command == "checkpoint":
            return cmd_checkpoint(args)
        if args.command == "chaos":
            return cmd_chaos(args)
        if args.command == "certs":
            return cmd_certs(args)
    except GeotrainError as exc:
        print(f"geotrain {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"geotrain {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `geotrain validate ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
