import os
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """SIGTERM (a CI time limit, a user's kill) unwinds the tests like Ctrl-C, so that their
    ``finally`` blocks run: launched runs are stopped, Compose projects taken down, nothing orphaned."""
    def _unwind(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, _unwind)
    # A suite started in the background of a shell without job control (`cmd &` in a script, some CI runners)
    # inherits SIGINT ignored, and so would every process a test starts: a link or a launcher keeps an ignored
    # SIGINT ignored (on purpose: geotrain.run.procs), so a test that stops one with SIGINT, as a user's Ctrl-C
    # would, hung (test_main_control_file_blackhole, in full runs only). The tests run as at a terminal.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _clear_geotrain_env(monkeypatch):
    """No GEOTRAIN_* variable from the caller's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("GEOTRAIN_"):
            monkeypatch.delenv(key, raising=False)


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
def repo() -> Path:
    return REPO
