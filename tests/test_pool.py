"""The worker pool's Ctrl-C behaviour while workers are still starting (imports take seconds on a busy machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SLOW_MODULE = """
import os
import time

if os.environ.get("SLOW_IMPORT"):  # set for the workers only: importing us takes them a while, as torch can
    time.sleep(4)


def work(job):
    return job


def failed(job, reason):
    return reason
"""

SCRIPT = """
import os
import sys

import slow_import
from genreclf.pool import pool_imap

if __name__ == "__main__":
    os.environ["SLOW_IMPORT"] = "1"
    print("started", flush=True)
    try:
        for result in pool_imap(range(4), 2, slow_import.work, slow_import.failed):
            print(result, flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
"""


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups: POSIX")
def test_a_ctrl_c_while_workers_import_prints_no_traceback(tmp_path):
    (tmp_path / "slow_import.py").write_text(textwrap.dedent(SLOW_MODULE))
    (tmp_path / "main.py").write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "main.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout.readline() == "started\n"
    time.sleep(1.5)  # the workers are in their 4-s import
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the parent and its workers get it
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert out == "interrupted\n"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
