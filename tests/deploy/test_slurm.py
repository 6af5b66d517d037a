"""`geotrain slurm render`: the scripts pass `bash -n`, follow the topology (a job per site, its link on
the control node, the ports of the control plane and the sites agreeing), and run: their own logic with
stand-ins for sbatch/srun/geotrain (fast), and a whole run in the "on the submitting host" mode
(slow: real etcd, coordinator, links and sites, no Slurm). tests/deploy/test_slurm_cluster.py submits
them to a real Slurm."""

import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geotrain.config.topology import load_topology, parse_topology
from geotrain.run.slurm import RenderError, SlurmOptions, main, render, write_deployment


def opts(tmp_path, **kw):
    return SlurmOptions(run_dir=str(tmp_path / "run"), deploy_dir=str(tmp_path / "deploy"), **kw)


@pytest.fixture
def demo(repo):
    return load_topology(repo / "topologies" / "demo.yaml")


@pytest.fixture
def three(repo):
    return load_topology(repo / "topologies" / "three-continents.yaml")


def bash_n(text, tmp_path, name="s.sh"):
    path = tmp_path / name
    path.write_text(text)
    return subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)


def exec_argv(script):
    """The words of the site script's final exec line (the command it runs)."""
    (line,) = [ln for ln in script.splitlines() if ln.startswith("exec ")]
    return shlex.split(line)


def flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("name", ["demo.yaml", "three-continents.yaml", "demo-ddp.yaml"])
@pytest.mark.parametrize("tls", [True, False])
def test_every_script_passes_bash_n(repo, tmp_path, name, tls):
    topo = load_topology(repo / "topologies" / name, [f"security.tls={str(tls).lower()}"])
    files = render(topo, opts(tmp_path, partition="gpu", account="proj", time="1:00:00"))
    assert set(files) == {"control.sbatch", "submit.sh", *(f"site-{s}.sbatch" for s in topo.site_names)}
    for fname, text in files.items():
        r = bash_n(text, tmp_path, fname)
        assert r.returncode == 0, f"{fname}: {r.stderr}"
        assert ("--certs" in text) == (tls and fname != "submit.sh")


def test_bash_n_fails_a_broken_script(demo, tmp_path):
    text = render(demo, opts(tmp_path))["control.sbatch"]
    assert bash_n(text.replace("done\n}", "}", 1), tmp_path).returncode != 0


def test_sbatch_directives_come_first_and_ask_for_the_sites_workers(tmp_path):
    topo = parse_topology({"name": "t", "sites": [{"name": "g", "workers": 4, "device": "cuda"}, {"name": "c", "workers": 3}]})
    files = render(topo, opts(tmp_path, partition="p1", time="2:00:00"))
    for fname, text in files.items():
        if not fname.endswith(".sbatch"):
            continue
        lines = text.splitlines()
        directives = [i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")]
        # sbatch stops reading directives at the first command: they are all before it
        first_command = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
        assert directives and max(directives) < first_command
        assert "#SBATCH --partition=p1" in lines and "#SBATCH --time=2:00:00" in lines
        assert f"#SBATCH --output={tmp_path}/run/slurm/%x-%j.out" in lines
    assert "#SBATCH --cpus-per-task=4" in files["site-g.sbatch"] and "#SBATCH --gres=gpu:4" in files["site-g.sbatch"]
    assert "#SBATCH --cpus-per-task=3" in files["site-c.sbatch"] and "--gres" not in files["site-c.sbatch"]
    assert "srun --nodes=1 --ntasks=1 --cpus-per-task=4" in files["site-g.sbatch"]


@pytest.mark.parametrize("name", ["demo.yaml", "three-continents.yaml"])
def test_each_site_dials_its_own_link_on_the_control_node(repo, tmp_path, name):
    topo = load_topology(repo / "topologies" / name)
    o = opts(tmp_path)
    files = render(topo, o)
    control = files["control.sbatch"]
    links = {}  # link name -> (listen port, target)
    for line in control.splitlines():
        if line.startswith('"$GEOTRAIN" link '):
            argv = shlex.split(line.rsplit(' >"$CTL', 1)[0])
            links[flag(argv, "--name")] = (int(flag(argv, "--listen").rsplit(":", 1)[1]), flag(argv, "--target"))
    assert f'--bind 0.0.0.0:{o.coordinator_port}' in control
    for i, s in enumerate(topo.sites):
        argv = exec_argv(files[f"site-{s.name}.sbatch"])
        i_site = argv.index("site")
        assert argv[i_site - 1] == '"$GEOTRAIN"' or argv[i_site - 1].endswith("GEOTRAIN}") or "$GEOTRAIN" in argv[i_site - 1]
        assert argv[i_site + 1] == s.name and argv[i_site + 2] == f"{o.deploy_dir}/topology.yaml"
        assert flag(argv, "--etcd") == f"$HOST:{o.etcd_port}"
        assert flag(argv, "--run-dir") == f"{o.run_dir}/site-{s.name}"
        port = int(flag(argv, "--coordinator").rsplit(":", 1)[1])
        spec = topo.link(s.name, topo.coordinator.at)
        name_ = f"{s.name}<->{topo.coordinator.at}"
        if spec is None:  # the coordinator's datacenter: no link, the coordinator itself
            assert port == o.coordinator_port and name_ not in links
        else:
            assert links[name_] == (port, f"127.0.0.1:{o.coordinator_port}")
    assert len(links) == sum(topo.link(s, topo.coordinator.at) is not None for s in topo.site_names)
    assert len({p for p, _ in links.values()}) == len(links)


def test_each_part_gets_the_ca_and_its_own_pair_only(demo, tmp_path):
    o = opts(tmp_path)
    write_deployment(demo, Path(o.deploy_dir), o)
    certs = Path(o.deploy_dir) / "certs"
    assert sorted(p.name for p in (certs / "coordinator").iterdir()) == ["ca.pem", "coordinator-key.pem", "coordinator.pem"]
    for s in demo.site_names:
        folder = certs / f"site-{s}"
        assert sorted(p.name for p in folder.iterdir()) == sorted(["ca.pem", f"site.{s}.pem", f"site.{s}-key.pem"])
        assert stat.S_IMODE((folder / f"site.{s}-key.pem").stat().st_mode) == 0o600
        assert f"--certs {folder}" in (Path(o.deploy_dir) / f"site-{s}.sbatch").read_text()
    assert stat.S_IMODE((Path(o.deploy_dir) / "submit.sh").stat().st_mode) == 0o755


def shim(folder, name, body):
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def test_submit_sh_submits_the_sites_after_the_control_plane(demo, tmp_path):
    """submit.sh's own logic, with a stand-in sbatch that records its arguments (a real Slurm:
    tests/deploy/test_slurm_cluster.py)."""
    o = opts(tmp_path)
    write_deployment(demo, Path(o.deploy_dir), o)
    bin_ = tmp_path / "bin"
    calls = tmp_path / "calls"
    shim(bin_, "sbatch", f'echo "$*" >>{calls}\nn=$(wc -l <{calls}); echo "$((100 + n));cluster"\n')
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", f"{o.deploy_dir}/submit.sh"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = calls.read_text().splitlines()
    assert lines[0] == f"--parsable {o.deploy_dir}/control.sbatch"
    assert lines[1:] == [f"--parsable --dependency=after:101 {o.deploy_dir}/site-{s}.sbatch" for s in demo.site_names]
    assert (Path(o.run_dir) / "slurm" / "jobs").read_text().splitlines() == \
        ["control 101", *(f"site {s} {102 + i}" for i, s in enumerate(demo.site_names))]


def test_a_site_waits_for_the_control_plane_then_runs_geotrain_site_under_srun(demo, tmp_path):
    o = opts(tmp_path, wait_s=1)
    write_deployment(demo, Path(o.deploy_dir), o)
    script = f"{o.deploy_dir}/site-eu-west.sbatch"
    bin_ = tmp_path / "bin"
    fake = shim(bin_, "geotrain", f'echo "geotrain $*" >{tmp_path}/ran\n')
    shim(bin_, "srun", f'echo "srun $*" >{tmp_path}/srun\nwhile [ "${{1#-}}" != "$1" ]; do shift; done\nexec "$@"\n')
    env = {**os.environ, "GEOTRAIN": str(fake), "PATH": f"{bin_}:{os.environ['PATH']}"}
    env.pop("SLURM_JOB_ID", None)
    # no control plane: it gives up after wait_s with the reason
    r = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "no control plane" in r.stderr and not (tmp_path / "ran").exists()
    ctl = Path(o.run_dir) / "control"
    ctl.mkdir(parents=True)
    (ctl / "control.env").write_text("GEOTRAIN_CONTROL_HOST=node7\n")
    r = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    ran = (tmp_path / "ran").read_text().split()
    assert ran[:4] == ["geotrain", "site", "eu-west", f"{o.deploy_dir}/topology.yaml"]
    assert flag(ran, "--etcd") == f"node7:{o.etcd_port}" and flag(ran, "--coordinator") == f"node7:{o.link_port(1)}"
    assert not (tmp_path / "srun").exists()  # outside a job: run directly
    r = subprocess.run(["bash", script], env={**env, "SLURM_JOB_ID": "5"}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "srun").read_text().split()[:4] == ["srun", "--nodes=1", "--ntasks=1", "--cpus-per-task=2"]


def test_a_multi_node_site_runs_one_geotrain_site_per_node_of_its_job(repo, tmp_path, monkeypatch):
    """The site script of a 2-node site, run with stand-ins: srun runs the task once per node (SLURM_NODEID 0
    and 1, as Slurm does), scontrol names the job's nodes; each node's command goes through geotrain site's
    own parser and node check (run_site replaced: nothing starts)."""
    from geotrain.run import site as site_mod

    topo = load_topology(repo / "topologies" / "demo.yaml", ["sites[1].nodes=2", "sites[1].workers=3"])
    o = opts(tmp_path, wait_s=1)
    write_deployment(topo, Path(o.deploy_dir), o)
    script = (Path(o.deploy_dir) / "site-eu-west.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script and "--ntasks=1" not in script
    assert bash_n(script, tmp_path).returncode == 0
    ctl = Path(o.run_dir) / "control"
    ctl.mkdir(parents=True)
    (ctl / "control.env").write_text("GEOTRAIN_CONTROL_HOST=ctl7\n")
    bin_ = tmp_path / "bin"
    fake = shim(bin_, "geotrain", f'printf "%s\\n" "$@" >{tmp_path}/ran-$SLURM_NODEID\n')
    shim(bin_, "scontrol", 'test "$*" = "show hostnames n[3-4]" && printf "n3\\nn4\\n"\n')
    shim(bin_, "srun", f'echo "srun $*" >{tmp_path}/srun\nwhile [ "${{1#-}}" != "$1" ]; do shift; done\n'
                       'for k in 0 1; do SLURM_NODEID=$k "$@" || exit $?; done\n')
    env = {**os.environ, "GEOTRAIN": str(fake), "PATH": f"{bin_}:{os.environ['PATH']}"}
    env.pop("SLURM_JOB_ID", None)
    r = subprocess.run(["bash", f"{o.deploy_dir}/site-eu-west.sbatch"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "spans 2 nodes" in r.stderr and "sbatch" in r.stderr  # outside a job: refused
    r = subprocess.run(["bash", f"{o.deploy_dir}/site-eu-west.sbatch"], env={**env, "SLURM_JOB_ID": "9",
                       "SLURM_JOB_NODELIST": "n[3-4]"}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "srun").read_text().split()[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1",
                                                           "--cpus-per-task=3", "--kill-on-bad-exit=1"]
    seen = []
    monkeypatch.setattr(site_mod, "run_site", lambda t, name, run_dir, *a, node, **kw: seen.append(
        (name, run_dir, node, site_mod.node_problem(t.site(name), node))) or 0)
    for k in (0, 1):
        argv = (tmp_path / f"ran-{k}").read_text().splitlines()
        assert argv[:3] == ["site", "eu-west", f"{o.deploy_dir}/topology.yaml"]
        assert flag(argv, "--etcd") == f"ctl7:{o.etcd_port}" and flag(argv, "--coordinator") == f"ctl7:{o.link_port(1)}"
        assert site_mod.main(argv[1:]) == 0
    base = Path(o.run_dir) / "site-eu-west"
    assert [(n, d, (x.rank, x.master_addr, x.master_port), p) for n, d, x, p in seen] == [
        ("eu-west", base, (0, "n3", o.rendezvous_port(1)), None),
        ("eu-west", Path(f"{base}-node1"), (1, "n3", o.rendezvous_port(1)), None)]
    # the one-node site of the same rendering is as before
    assert "#SBATCH --nodes=1" in (Path(o.deploy_dir) / "site-us-east.sbatch").read_text()


def test_refused_topologies_and_options(tmp_path, demo):
    ring = parse_topology({"name": "t", "sites": [{"name": "a", "workers": 1}, {"name": "b", "workers": 1}],
                           "training": {"merge": "ring"}})
    with pytest.raises(RenderError, match="training.merge"):
        render(ring, opts(tmp_path))
    with pytest.raises(RenderError, match="absolute"):
        render(demo, SlurmOptions(run_dir="run", deploy_dir=str(tmp_path)))
    with pytest.raises(RenderError, match="port-base"):
        render(demo, opts(tmp_path, port_base=80))


def test_cli(repo, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["render", str(repo / "topologies" / "demo.yaml"), "-o", str(out), "--set", "training.rounds=3",
                 "--geotrain", "/opt/venv/bin/geotrain", "--port-base", "9000", "--linger", "5"]) == 0
    assert str(out / "control.sbatch") in capsys.readouterr().out.split()
    control = (out / "control.sbatch").read_text()
    assert "GEOTRAIN=${GEOTRAIN:-/opt/venv/bin/geotrain}" in control and "--bind 0.0.0.0:9000 --linger 5" in control
    assert load_topology(out / "topology.yaml").training.rounds == 3
    assert main(["render", str(repo / "topologies" / "demo.yaml"), "-o", str(out), "--port-base", "1"]) == 2
    assert "port-base" in capsys.readouterr().err
    assert main(["bogus"]) == 2


def free_port_base(span=110):
    """A port P with P..P+2 and P+100..P+101 free now (the demo's control plane)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + span > 65000:
            continue
        try:
            for p in (base, base + 1, base + 2, base + 100, base + 101):
                with socket.socket() as t:
                    t.bind(("0.0.0.0", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


def run_on_this_host(deploy: Path, env: dict, timeout_s: float = 300) -> tuple[int, list[int]]:
    """The "on the submitting host" mode: control.sbatch and every site script under bash, no Slurm."""
    control = subprocess.Popen(["bash", str(deploy / "control.sbatch")], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    sites = [subprocess.Popen(["bash", str(p)], env=env, start_new_session=True)
             for p in sorted(deploy.glob("site-*.sbatch"))]
    try:
        codes = [s.wait(timeout=timeout_s) for s in sites]
        return control.wait(timeout=timeout_s), codes
    finally:
        for p in [control, *sites]:
            if p.poll() is None:
                os.killpg(p.pid, 15)
                p.wait(timeout=30)


@pytest.mark.slow
def test_the_scripts_run_a_whole_demo_on_the_submitting_host(repo, tmp_path):
    topo = load_topology(repo / "topologies" / "demo.yaml", ["training.rounds=2", "training.inner_steps=5"])
    o = opts(tmp_path, geotrain=str(Path(sys.executable).parent / "geotrain"), python=sys.executable,
             port_base=free_port_base(), linger_s=3.0,
             wait_s=120)
    write_deployment(topo, Path(o.deploy_dir), o)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GEOTRAIN_"))}
    env["GEOTRAIN_CONTROL_HOST"] = "127.0.0.1"
    control_code, site_codes = run_on_this_host(Path(o.deploy_dir), env)
    assert site_codes == [0, 0] and control_code == 0
    run = Path(o.run_dir)
    check = subprocess.run([sys.executable, "-m", "geotrain.cli", "check", str(run / "control")], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert " 0 violated" in check.stdout
    assert (run / "control" / "links" / "us-east--hub.json").is_file()
    assert not (run / "control" / "control.env").exists()  # removed when the control plane stopped
    # nothing left listening on the control plane's ports
    for port in (o.coordinator_port, o.etcd_port, o.link_port(0), o.link_port(1)):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, port
