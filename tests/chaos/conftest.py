"""Session fixtures of the chaos suite: the Docker engine, the image, the report.

The suite is skipped, with the reason, only when no Docker engine answers (start one with
``scripts/docker-engine.sh``). An engine without ``docker-compose`` is an error, not a skip.
The image is ``geotrain-offline:latest`` built by ``scripts/offline-image.sh`` (no registry
needed), or ``$CHAOS_IMAGE`` when set (an image built from deploy/Dockerfile).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass

import pytest

from tests.chaos.harness import PROJECT_PREFIX, REPO, Report, chaos_seed, results_dir, sweep


def pytest_report_header(config):
    return f"chaos: exploratory seed {chaos_seed()} (set CHAOS_SEED to replay); results in {results_dir()}"


@dataclass(frozen=True)
class ChaosImage:
    name: str
    offline: bool
    build_s: float | None


@pytest.fixture(scope="session")
def session_prefix() -> str:
    return f"{PROJECT_PREFIX}{os.getpid()}"


@pytest.fixture(scope="session")
def docker_client(session_prefix):
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any way of not reaching the engine is a skip
        pytest.skip(f"chaos suite needs a Docker engine and none answers ({type(exc).__name__}: {exc}); "
                    f"start one with `bash scripts/docker-engine.sh` (root)")
    if shutil.which("docker-compose") is None:
        pytest.fail("a Docker engine answers but `docker-compose` (Compose v1) is not installed; "
                    "run `bash scripts/docker-engine.sh`")
    yield client
    sweep(client, session_prefix)  # anything a scenario left behind, even after an interruption
    client.close()


@pytest.fixture(scope="session")
def chaos_image(docker_client) -> ChaosImage:
    name = os.environ.get("CHAOS_IMAGE")
    if name:
        docker_client.images.get(name)  # raises ImageNotFound: a clear error
        return ChaosImage(name, offline=False, build_s=None)
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(REPO / "scripts" / "offline-image.sh")], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.fail(f"scripts/offline-image.sh failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return ChaosImage("geotrain-offline:latest", offline=True, build_s=round(time.monotonic() - t0, 2))


@pytest.fixture(scope="session")
def report(chaos_image):
    path = results_dir() / "report.md"
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    build = f"built in {chaos_image.build_s}s" if chaos_image.build_s is not None else "prebuilt"
    preamble = (f"# Chaos suite report\n\n"
                f"Command: `.venv/bin/pytest tests/chaos -m chaos` (started {started}; {platform.node()}, "
                f"{os.cpu_count()} CPUs). Image: `{chaos_image.name}` ({build}). Exploratory seed: {chaos_seed()} "
                f"(replay with `CHAOS_SEED={chaos_seed()}`).\n\n"
                f"Each row is one Compose deployment (etcd, coordinator, one link per site, one container per "
                f"site); `invariants` are the verdicts of `geotrain check --json` on its run directory. "
                f"Recovery s: from the fault's undo to the first commit that includes the faulted site again "
                f"(any commit, for a fault of the coordinator, etcd or a link). Rounds lost: commits that lacked "
                f"a site, and failed rounds, between the fault and that commit.")
    rep = Report(path, preamble)
    yield rep
    rep.preamble += f"\n\nWhole session: {time.monotonic() - t0:.0f}s for {len(rep.rows)} scenarios."
    rep.write()
