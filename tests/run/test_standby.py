"""The warm standby (geotrain.run.standby): which starts it may take over, and a real one becoming a worker."""

import os
import subprocess
import sys
import textwrap

from geotrain.run import procs
from geotrain.run.standby import READY, activation, can_take

PY = sys.executable


def test_it_takes_python_m_and_scripts_of_the_same_environment_only():
    assert can_take([PY, "-m", "geotrain.worker.main"], PY)
    assert can_take([PY, "train.py", "--lr", "3"], PY)
    assert can_take([os.path.join(os.path.dirname(PY), "python3"), "train.py"], PY) == \
        os.path.exists(os.path.join(os.path.dirname(PY), "python3"))
    assert not can_take([PY, "-m"], PY)  # no module
    assert not can_take([PY, "-c", "print(1)"], PY)  # an option we do not replay
    assert not can_take(["/bin/sh", "-c", "python train.py"], PY)  # a wrapper: its own process
    assert not can_take(["/usr/bin/env"], PY)
    assert not can_take([PY], PY)


def _standby(tmp_path):
    return procs.spawn([PY, "-m", "geotrain.run.standby"], env=procs.env_with(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, stdin=subprocess.PIPE)


def test_a_standby_becomes_the_script_with_its_env_cwd_and_argv_and_exit_code(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        print("env", os.environ.get("GEOTRAIN_SITE"), "argv", sys.argv[1:], "cwd", os.getcwd(), "name", __name__)
        sys.exit(7)
    """))
    p = _standby(tmp_path)
    out, err = p.communicate(activation([PY, str(script), "a", "b"], {"GEOTRAIN_SITE": "eu", "PATH": os.environ["PATH"]},
                                        str(tmp_path)), timeout=120)
    text = out.decode()
    assert p.returncode == 7, err.decode()[-2000:]
    assert READY in text and f"env eu argv ['a', 'b'] cwd {tmp_path} name __main__" in text


def test_a_standby_runs_a_module_as_main(tmp_path):
    p = _standby(tmp_path)
    out, err = p.communicate(activation([PY, "-m", "platform", "--terse"], dict(os.environ), str(tmp_path)),
                             timeout=120)
    lines = out.decode().strip().splitlines()
    assert p.returncode == 0, err.decode()[-2000:]
    assert lines[0] == READY and lines[1].startswith("Linux")  # what `python -m platform --terse` prints


def test_an_unused_standby_exits_when_its_stdin_closes(tmp_path):
    p = _standby(tmp_path)
    out, _ = p.communicate(b"", timeout=120)
    assert p.returncode == 0 and out.decode().strip() == READY


def test_a_standby_has_paid_for_what_a_first_optimizer_imports(tmp_path):
    """torch._dynamo comes with a process's first optimizer (1.5 s here), not with `import torch`: a
    standby that became a worker builds its optimizer without importing it (what is already loaded costs
    nothing), and a fresh interpreter does import it there (so the check can tell the two apart)."""
    script = tmp_path / "first_optimizer.py"
    script.write_text(textwrap.dedent("""
        import sys
        import torch
        before = "torch._dynamo" in sys.modules
        torch.optim.AdamW([torch.zeros(2, requires_grad=True)])
        print("dynamo before", before, "after", "torch._dynamo" in sys.modules)
    """))
    p = _standby(tmp_path)
    out, err = p.communicate(activation([PY, str(script)], dict(os.environ), str(tmp_path)), timeout=120)
    assert p.returncode == 0, err.decode()[-2000:]
    assert "dynamo before True after True" in out.decode()
    fresh = subprocess.run([PY, str(script)], capture_output=True, text=True, timeout=120)
    assert "dynamo before False after True" in fresh.stdout, fresh.stderr[-2000:]


def test_a_standby_for_a_compiled_model_has_imported_torch_compiles_backend(tmp_path):
    script = tmp_path / "which.py"
    script.write_text('import sys\nprint("inductor", "torch._inductor.compile_fx" in sys.modules)\n')
    for flag, want in (([], "inductor False"), (["--compile"], "inductor True")):
        p = procs.spawn([PY, "-m", "geotrain.run.standby", *flag], env=procs.env_with(), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, stdin=subprocess.PIPE)
        out, err = p.communicate(activation([PY, str(script)], dict(os.environ), str(tmp_path)), timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
        assert want in out.decode(), (flag, out)
