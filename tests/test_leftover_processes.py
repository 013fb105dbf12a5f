"""The suite's own guard (tests/conftest.py): a service process the tests started and left running
fails the run at its end."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import leftover_processes


def test_a_server_process_left_running_is_reported_until_it_is_stopped():
    # A stand-in with a server's command line (the guard matches on it), started by this session.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "moto.server"])
    try:
        assert proc.pid in [pid for pid, _ in leftover_processes()]
    finally:
        proc.kill()
        proc.wait()
    assert proc.pid not in [pid for pid, _ in leftover_processes()]
