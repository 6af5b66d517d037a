"""``geotrain slurm render``: a topology as Slurm batch scripts, for users who submit by hand.

    geotrain slurm render TOPOLOGY -o DIR [--set path=value ...] [--run-dir SHARED] [--geotrain CMD]
                          [--python CMD] [--etcd-bin CMD] [--port-base P] [--partition P] [--account A] [--time T]

writes into ``DIR`` (every path in the scripts absolute, so ``DIR`` and the run directory must lie on
a file system every node sees, as a cluster's home or scratch does):

======================  ========================================================================
``control.sbatch``      the control plane on one node: etcd, ``geotrain coordinator`` and one
                        ``geotrain link`` per site whose place differs from ``coordinator.at``
                        (listening on every interface, forwarding to the coordinator). Once all
                        listen it writes ``RUN/control/control.env`` (``GEOTRAIN_CONTROL_HOST=``
                        the node's name); it ends when the coordinator does (the run is done and
                        the linger has passed), stopping etcd and the links.
                        Also runs without Slurm: ``bash control.sbatch`` on the submitting host.
``site-<name>.sbatch``  one site: waits for ``control.env``, then ``srun`` runs ``geotrain site
                        NAME`` on the job's node (each of its nodes: below), dialling its link on the control node (or the
                        coordinator itself for a site in the coordinator's datacenter)
``submit.sh``           ``sbatch`` of the control plane, then of every site with
                        ``--dependency=after:<control>`` (a site starts once the control plane has
                        started); ``submit.sh --control-here`` runs the control plane on this host
                        instead, in the background. Job ids go to ``RUN/slurm/jobs``.
``topology.yaml``       the validated topology (overrides applied), read by every part
``certs/``              with ``security.tls``: the run's CA and pairs, and one folder per part
                        (``certs/coordinator``, ``certs/site-<name>``) holding the CA certificate and
                        that part's own pair only, which is what each part is given
======================  ========================================================================

Each part writes its own run directory (``RUN/control``, ``RUN/site-<name>``, as on separate hosts):
``geotrain report RUN/control RUN/site-*`` reports them as one run, ``geotrain check RUN/control`` checks
the coordinator's history. Ports are fixed at render time (``--port-base`` P: the coordinator P, etcd
P+1 and P+2, the link of the i-th site P+100+i) because the sites must know them before the control
plane runs (the i-th site's nodes meet on P+200+i); the host is not, the control plane names it in
``control.env``.

Sites of several nodes (``sites[].nodes`` > 1): the site's job asks for that many nodes, one task each
(``--ntasks-per-node=1``); ``srun`` runs on every node ``geotrain site NAME --node-rank $SLURM_NODEID
--master-addr FIRST --master-port P+200+i`` (FIRST: the job's first node, from ``scontrol show hostnames``),
node 0's run directory ``RUN/site-<name>``, node K's ``RUN/site-<name>-nodeK``; ``--kill-on-bad-exit``: a
node whose ``geotrain site`` fails (it restarts its own workers first) ends the site's step. Such a script
runs only under sbatch (it says so otherwise).

Not yet here: ring and hierarchical merges
(``geotrain site`` starts no ring peers; refused). Watching the jobs and submitting a failed site's
again is ``geotrain launch --backend slurm`` (geotrain.run.slurm_launch). etcd listens without TLS on every interface of the control node (as in Compose:
etcd's TLS is an open item of docs/security.md). :func:`render` is pure.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from geotrain.config.derive import derive
from geotrain.config.topology import Topology
from geotrain.errors import GeotrainError
from geotrain.run.compose import link_files, remote_sites


class RenderError(GeotrainError):
    """The topology cannot be rendered for Slurm (yet): the message says which field and why."""

    exit_code = 2


@dataclass(frozen=True)
class SlurmOptions:
    """Where things are on the cluster, and what every job asks of Slurm."""

    run_dir: str
    """The shared run directory (absolute): RUN/control, RUN/site-<name>, RUN/slurm (the jobs' output)."""
    deploy_dir: str
    """Where the scripts, topology.yaml and certs/ are (absolute)."""
    geotrain: str = "geotrain"
    """The geotrain command on the nodes (a path into a virtual environment, say)."""
    python: str = "python3"
    """The Python of geotrain on the control node (etcd runs under ``python -m geotrain.control.serve``)."""
    etcd_bin: str | None = None
    """The etcd binary on the control node (GEOTRAIN_ETCD_BIN); None: ``etcd`` on PATH, else /usr/bin/etcd."""
    port_base: int = 7000
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    """Each job's time limit (sbatch --time), e.g. "2:00:00"; None: the partition's default."""
    wait_s: int = 600
    """How long a site waits for the control plane's control.env."""
    linger_s: float | None = None
    """The coordinator's --linger (None: its default): how long it serves after the last commit, while the
    sites fetch the final model; the control plane's job ends then."""

    @property
    def coordinator_port(self) -> int:
        return self.port_base

    @property
    def etcd_port(self) -> int:
        return self.port_base + 1

    @property
    def etcd_peer_port(self) -> int:
        return self.port_base + 2

    def link_port(self, index: int) -> int:
        return self.port_base + 100 + index

    def rendezvous_port(self, index: int) -> int:
        """Where the nodes of the i-th site meet (its job's first node: ``--master-port``)."""
        return self.port_base + 200 + index


def renderable_problem(topo: Topology, opts: SlurmOptions) -> str | None:
    """Why ``topo`` cannot be rendered (None: it can)."""
    if topo.training.merge != "star" and len(topo.sites) > 1:
        return (f"training.merge: {topo.training.merge!r}: sites on separate hosts (geotrain site) start no ring peers "
                "yet; render a star topology")
    if not 1024 <= opts.port_base <= 65535 - 200 - len(topo.sites):
        return f"--port-base {opts.port_base}: needs 1024..{65535 - 200 - len(topo.sites)}"
    for what, path in (("--run-dir", opts.run_dir), ("the output directory", opts.deploy_dir)):
        if not path.startswith("/"):
            return f"{what} {path!r}: must be absolute (the jobs run elsewhere)"
    return None


def job_name(topo: Topology, part: str) -> str:
    return f"geotrain-{topo.name}-{part}"


def site_part(site: str) -> str:
    return f"site-{site}"


def part_certs(opts: SlurmOptions, part: str) -> str:
    """The folder of one part's certificates: the CA certificate and its own pair."""
    return f"{opts.deploy_dir}/certs/{part}"


def _header(topo: Topology, opts: SlurmOptions, part: str, cpus: int, extra: tuple[str, ...] = (),
            nodes: int = 1) -> list[str]:
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={job_name(topo, part)}",
             f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks=1" if nodes == 1 else "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --cpus-per-task={cpus}",
             f"#SBATCH --output={opts.run_dir}/slurm/%x-%j.out"]
    for flag, value in (("partition", opts.partition), ("account", opts.account), ("time", opts.time)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {e}" for e in extra]
    return lines


_WAIT = r'''
# wait_ready LOG PID SECONDS: until LOG has a line starting READY (etcd: healthy with auth enforced;
# the coordinator: serving); fails, showing the log's end, if PID dies first or time runs out.
wait_ready() {
    local deadline=$((SECONDS + $3))
    until grep -q '^READY' "$1" 2>/dev/null; do
        kill -0 "$2" 2>/dev/null || { echo "geotrain control: process $2 exited before it was ready:" >&2; tail -n 20 "$1" >&2; return 1; }
        [ "$SECONDS" -lt "$deadline" ] || { echo "geotrain control: $1 not ready after $3 s" >&2; return 1; }
        sleep 0.2
    done
}
# wait_port PORT PID SECONDS: until something listens on 127.0.0.1:PORT; fails if PID dies first.
wait_port() {
    local deadline=$((SECONDS + $3))
    until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
        kill -0 "$2" 2>/dev/null || { echo "geotrain control: process $2 exited before port $1 listened" >&2; return 1; }
        [ "$SECONDS" -lt "$deadline" ] || { echo "geotrain control: nothing on port $1 after $3 s" >&2; return 1; }
        sleep 0.2
    done
}
'''


def control_script(topo: Topology, opts: SlurmOptions) -> str:
    """etcd, the coordinator and the links on one node (or on the submitting host, run with bash)."""
    q = shlex.quote
    ctl = f"{opts.run_dir}/control"
    links = derive(topo, Path(ctl)).site_links
    lines = _header(topo, opts, "control", 1 + len(remote_sites(topo)))
    lines += [
        f"# Rendered by `geotrain slurm render` for topology {topo.name} (sha256 {topo.digest()}): render again, do not edit.",
        "# The control plane of the run: etcd, the coordinator, a WAN link emulator per remote site.",
        "# Submit with submit.sh (or sbatch), or run it on the submitting host: bash control.sbatch",
        "set -euo pipefail",
        f"GEOTRAIN=${{GEOTRAIN:-{q(opts.geotrain)}}}",
        f"PYTHON=${{PYTHON:-{q(opts.python)}}}",
        *([f"export GEOTRAIN_ETCD_BIN=${{GEOTRAIN_ETCD_BIN:-{q(opts.etcd_bin)}}}"] if opts.etcd_bin else []),
        f"CTL={q(ctl)}",
        f"TOPOLOGY={q(opts.deploy_dir + '/topology.yaml')}",
        '# The name the sites dial: this node (GEOTRAIN_CONTROL_HOST overrides it, e.g. with an address).',
        'HOST=${GEOTRAIN_CONTROL_HOST:-$(hostname)}',
        'mkdir -p "$CTL/links"',
        'rm -f "$CTL/control.env"',
        "pids=()",
        'cleanup() { rm -f "$CTL/control.env"; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait || true; }',
        "trap cleanup EXIT",
        "trap 'exit 143' TERM INT",
        _WAIT,
        # etcd as `geotrain launch` runs it (geotrain.control.serve): with TLS, https and auth (each part's
        # certificate name its etcd user); READY once healthy with auth enforced. Its data in the run directory.
        f'"$PYTHON" -m geotrain.control.serve serve "$TOPOLOGY" --data-dir "$CTL/etcd" --listen 0.0.0.0 '
        f'--advertise "$HOST" --port {opts.etcd_port} --peer-port {opts.etcd_peer_port}'
        + (f' --certs {q(part_certs(opts, "etcd"))}' if topo.security.tls else '') + ' >"$CTL/etcd.out" 2>&1 &',
        'pids+=($!)',
        'wait_ready "$CTL/etcd.out" $! 90',
        # the coordinator: on every interface (the sites dial HOST); it exits once the run is done
        f'"$GEOTRAIN" coordinator "$TOPOLOGY" --run-dir "$CTL" --etcd 127.0.0.1:{opts.etcd_port} '
        f'--bind 0.0.0.0:{opts.coordinator_port}'
        + (f' --linger {opts.linger_s:g}' if opts.linger_s is not None else '')
        + (f' --certs {q(part_certs(opts, "coordinator"))}' if topo.security.tls else '') + ' >"$CTL/coordinator.log" 2>&1 &',
        'coordinator=$!',
        'pids+=($coordinator)',
        'wait_ready "$CTL/coordinator.log" $coordinator 120',
    ]
    for i, s in enumerate(topo.sites):
        if s.name not in links:
            continue
        stats, control = link_files(topo, s.name, ctl)
        argv = links[s.name].args(listen=f"0.0.0.0:{opts.link_port(i)}", target=f"127.0.0.1:{opts.coordinator_port}",
                                  stats_file=stats, control_file=control)
        lines += [f'"$GEOTRAIN" link {shlex.join(argv)} >"$CTL/link-{s.name}.log" 2>&1 &',
                  'pids+=($!)',
                  f'wait_port {opts.link_port(i)} $! 60']
    lines += [
        '# Ready: the sites wait for this file (written whole, then renamed).',
        'printf "GEOTRAIN_CONTROL_HOST=%s\\n" "$HOST" >"$CTL/control.env.tmp"',
        'mv "$CTL/control.env.tmp" "$CTL/control.env"',
        'echo "geotrain control plane of ' + topo.name + ' ready on $HOST"',
        'status=0',
        'wait "$coordinator" || status=$?',
        'echo "coordinator exited with status $status"',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def site_script(topo: Topology, opts: SlurmOptions, index: int) -> str:
    """One site's job: wait for the control plane, then srun ``geotrain site`` on the job's node."""
    q = shlex.quote
    s = topo.sites[index]
    remote = s.name in set(remote_sites(topo))
    port = opts.link_port(index) if remote else opts.coordinator_port
    extra = (f"--gres=gpu:{s.workers}",) if s.device == "cuda" else ()
    part = site_part(s.name)
    lines = _header(topo, opts, s.name, s.workers, extra, nodes=s.nodes)
    where = "one node" if s.nodes == 1 else f"each of {s.nodes} nodes"
    lines += [
        f"# Rendered by `geotrain slurm render` for topology {topo.name} (sha256 {topo.digest()}): render again, do not edit.",
        f"# Site {s.name}: {s.workers} worker(s) on {where}, reaching the coordinator "
        + ("through its WAN link emulator on the control node." if remote else "directly (its datacenter)."),
        "set -euo pipefail",
        *([f'[ -n "${{SLURM_JOB_ID:-}}" ] || {{ echo "site {s.name} spans {s.nodes} nodes: submit this script with '
           f'sbatch (it runs one geotrain site per node of the job)" >&2; exit 2; }}'] if s.nodes > 1 else []),
        f"GEOTRAIN=${{GEOTRAIN:-{q(opts.geotrain)}}}",
        f"ENV_FILE={q(opts.run_dir + '/control/control.env')}",
        f"deadline=$((SECONDS + {opts.wait_s}))",
        'until [ -f "$ENV_FILE" ]; do',
        f'    [ "$SECONDS" -lt "$deadline" ] || {{ echo "site {s.name}: no control plane ($ENV_FILE) after {opts.wait_s} s" >&2; exit 1; }}',
        "    sleep 1",
        "done",
        "# Read, not sourced: the file names the control plane's host and nothing is executed from it.",
        """HOST=$(sed -n 's/^GEOTRAIN_CONTROL_HOST=//p' "$ENV_FILE")""",
        '[ -n "$HOST" ] || { echo "site ' + s.name + ': $ENV_FILE names no host" >&2; exit 1; }',
    ]
    site_argv = (f'"$GEOTRAIN" site {q(s.name)} {q(opts.deploy_dir + "/topology.yaml")} '
                 f'--etcd "$HOST:{opts.etcd_port}" --coordinator "$HOST:{port}"'
                 + (f' --certs {q(part_certs(opts, part))}' if topo.security.tls else ''))
    run_dir = q(opts.run_dir + "/" + part)
    if s.nodes == 1:
        lines += [
            "# Inside a job: one task on the job's node (srun does not take sbatch's --cpus-per-task since Slurm 22.05).",
            "launch=()",
            f'if [ -n "${{SLURM_JOB_ID:-}}" ]; then launch=(srun --nodes=1 --ntasks=1 --cpus-per-task={s.workers}); fi',
            f'exec "${{launch[@]}}" {site_argv} --run-dir {run_dir}',
        ]
    else:
        lines += [
            "# The site's group meets on the job's first node; node K's run directory: RUN/site-NAME (K = 0) or",
            "# RUN/site-NAME-nodeK. One task per node, each its node's `geotrain site --node-rank $SLURM_NODEID`; a",
            "# task that fails ends the step (a node's geotrain site restarts its own workers: its exit is the site's).",
            'MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads it all: no SIGPIPE under pipefail',
            '[ -n "$MASTER" ] || { echo "site ' + s.name + ': no node in SLURM_JOB_NODELIST" >&2; exit 1; }',
            f'exec srun --nodes={s.nodes} --ntasks-per-node=1 --cpus-per-task={s.workers} --kill-on-bad-exit=1 \\',
            """    bash -c 'k=$SLURM_NODEID; d=$1; [ "$k" = 0 ] || d="$1-node$k"; shift; exec "$@" --node-rank "$k" --run-dir "$d"' \\""",
            f'    geotrain-site {run_dir} {site_argv} --master-addr "$MASTER" --master-port {opts.rendezvous_port(index)}',
        ]
    return "\n".join(lines) + "\n"


def submit_script(topo: Topology, opts: SlurmOptions) -> str:
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# Rendered by `geotrain slurm render` for topology {topo.name}: submit the whole run.",
        "#   bash submit.sh                 the control plane as a job, then every site after it has started",
        "#   bash submit.sh --control-here  the control plane on this host (in the background), then the sites",
        "set -euo pipefail",
        f"DIR={q(opts.deploy_dir)}",
        f"RUN={q(opts.run_dir)}",
        'mkdir -p "$RUN/slurm" "$RUN/control"',
        'rm -f "$RUN/control/control.env" "$RUN/slurm/jobs"',
        "dep=()",
        'if [ "${1:-}" = "--control-here" ]; then',
        '    nohup bash "$DIR/control.sbatch" >"$RUN/control/control.out" 2>&1 </dev/null &',
        '    echo "control here $!" | tee -a "$RUN/slurm/jobs"',
        "else",
        '    ctl=$(sbatch --parsable "$DIR/control.sbatch")',
        '    ctl=${ctl%%;*}',
        '    echo "control $ctl" | tee -a "$RUN/slurm/jobs"',
        '    dep=(--dependency="after:$ctl")',
        "fi",
    ]
    for s in topo.sites:
        lines += [f'id=$(sbatch --parsable "${{dep[@]}}" "$DIR/site-{s.name}.sbatch")',
                  f'echo "site {s.name} ${{id%%;*}}" | tee -a "$RUN/slurm/jobs"']
    return "\n".join(lines) + "\n"


def render(topo: Topology, opts: SlurmOptions) -> dict[str, str]:
    """The scripts deploying ``topo``, by file name."""
    problem = renderable_problem(topo, opts)
    if problem is not None:
        raise RenderError(problem)
    files = {"control.sbatch": control_script(topo, opts)}
    for i, s in enumerate(topo.sites):
        files[f"site-{s.name}.sbatch"] = site_script(topo, opts, i)
    files["submit.sh"] = submit_script(topo, opts)
    return files


# ---- writing ---------------------------------------------------------------------------------------


def split_certs(topo: Topology, certs: Path) -> dict[str, Path]:
    """Make the run's certificates in ``certs`` (kept if there) and one folder per part beside them with the
    CA certificate and that part's own pair only (``coordinator``, ``site-<name>``; ``etcd``: its own and the
    launcher's, with which it turns its auth on); returns part -> folder."""
    from geotrain.security.pki import CA_CERT, COORDINATOR, ETCD, LAUNCHER, ensure_run_certs, site_name

    ensure_run_certs(certs, topo.site_names, topo.name)
    parts = {"etcd": (ETCD, LAUNCHER), "coordinator": (COORDINATOR,),
             **{site_part(s): (site_name(s),) for s in topo.site_names}}
    out = {}
    for part, names in parts.items():
        folder = certs / part
        folder.mkdir(mode=0o700, exist_ok=True)
        for f in (CA_CERT, *(f for n in names for f in (f"{n}.pem", f"{n}-key.pem"))):
            shutil.copy2(certs / f, folder / f)
        out[part] = folder
    return out


def write_deployment(topo: Topology, out_dir: Path, opts: SlurmOptions, *, source: str = "<topology>") -> list[Path]:
    """Write the scripts, topology.yaml and certs/ into ``out_dir``; return the scripts written."""
    from geotrain.run.k8s import topology_yaml

    problem = renderable_problem(topo, opts)
    if problem is not None:
        raise RenderError(problem)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "topology.yaml").write_text(topology_yaml(topo, source, by="geotrain slurm render"))
    if topo.security.tls:
        split_certs(topo, out_dir / "certs")
    written = []
    for name, text in render(topo, opts).items():
        path = out_dir / name
        path.write_text(text)
        path.chmod(0o755)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """``geotrain slurm render``: 0 when written, 2 on a bad topology or flag."""
    from geotrain.config.topology import load_topology

    p = argparse.ArgumentParser(prog="geotrain slurm", description="Slurm batch scripts of a topology (a job per site).")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = sub.add_parser("render", help="write control.sbatch, site-NAME.sbatch, submit.sh into a directory")
    r.add_argument("topology", type=Path, help="the topology file (YAML)")
    r.add_argument("-o", "--out", type=Path, required=True, help="directory to write into (on a shared file system)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a field, e.g. --set training.rounds=5")
    r.add_argument("--run-dir", type=Path, default=None, help="the shared run directory (default: OUT/run)")
    r.add_argument("--geotrain", default="geotrain", help="the geotrain command on the nodes (default %(default)s)")
    r.add_argument("--python", default="python3",
                   help="geotrain's Python on the control node, which runs etcd (default %(default)s)")
    r.add_argument("--etcd-bin", default=None, help="the etcd binary on the control node (default: etcd on PATH)")
    r.add_argument("--port-base", type=int, default=7000,
                   help="coordinator P, etcd P+1 and P+2, the i-th site's link P+100+i (default %(default)s)")
    r.add_argument("--partition", default=None)
    r.add_argument("--account", default=None)
    r.add_argument("--time", default=None, help="each job's time limit, e.g. 2:00:00")
    r.add_argument("--linger", type=float, default=None, dest="linger_s",
                   help="seconds the coordinator serves after the last commit (default: its own, 30)")
    r.add_argument("--wait", type=int, default=600, dest="wait_s",
                   help="seconds a site waits for the control plane (default %(default)s)")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        topo = load_topology(args.topology, args.overrides)
        out = args.out.resolve()
        opts = SlurmOptions(run_dir=str((args.run_dir or out / "run").resolve()), deploy_dir=str(out),
                            geotrain=args.geotrain, python=args.python, etcd_bin=args.etcd_bin, port_base=args.port_base,
                            partition=args.partition, account=args.account, time=args.time, wait_s=args.wait_s,
                            linger_s=args.linger_s)
        written = write_deployment(topo, out, opts, source=str(args.topology))
    except GeotrainError as exc:
        print(f"geotrain slurm: {exc}", file=sys.stderr)
        return exc.exit_code
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
