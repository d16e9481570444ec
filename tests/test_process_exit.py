"""The prompt exit of a finished process (bnaudit.process_exit): nothing registered or buffered is lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SORTED = sorted(str(p) for p in (ROOT / "fixtures" / "ddp_nosync_sorted").glob("ckpt_rank*.pt"))


def _python(code: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, cwd=ROOT, timeout=120)


EXIT_AFTER_WORK = """
import atexit, sys
from pathlib import Path
from bnaudit.process_exit import exit_now
marker = Path(sys.argv[1])
atexit.register(lambda: marker.write_text("exit handler ran"))
sys.stdout.write("x" * 300000)  # more than any stream buffer holds
sys.stderr.write("partial line without newline")
exit_now(3)
"""


def test_exit_handlers_run_and_streams_are_flushed(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    proc = _python(EXIT_AFTER_WORK, str(marker))
    assert proc.returncode == 3
    assert proc.stdout == b"x" * 300000
    assert proc.stderr == b"partial line without newline"
    assert marker.read_text() == "exit handler ran"


WAIT_FOR_THREAD = """
import sys, threading, time
from pathlib import Path
from bnaudit.process_exit import exit_now
def late_writer():
    time.sleep(0.5)
    Path(sys.argv[1]).write_text("thread finished")
threading.Thread(target=late_writer).start()  # a non-daemon thread, as a user's data module might start
exit_now(0)
"""


def test_a_running_non_daemon_thread_is_waited_for(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    proc = _python(WAIT_FOR_THREAD, str(marker))
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "thread finished"


def test_compare_into_a_closed_pipe_exits_without_a_traceback() -> None:
    # `bnaudit compare ... | head -c 100`: the reader leaves before the report is written.
    command = f"{sys.executable} -m bnaudit compare --format json {' '.join(SORTED)} | head -c 100"
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, cwd=ROOT, timeout=120
    )
    assert len(proc.stdout) == 100
    assert b"Traceback" not in proc.stderr and b"Exception ignored" not in proc.stderr, proc.stderr
    assert proc.returncode == 1  # the gate fails on these ranks; a broken pipe never turns 1 into 0


DATA_WITH_EXIT_HOOK = """
import atexit, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from fixtures.digits import calibration_data as _data

def calibration_data(**kwargs):
    atexit.register(lambda: Path({marker!r}).write_text("exit handler ran"))
    return _data(**kwargs)
"""


def test_a_run_that_imported_torch_still_runs_exit_handlers(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    data = tmp_path / "hooked_data.py"
    data.write_text(DATA_WITH_EXIT_HOOK.format(root=str(ROOT), marker=str(marker)))
    argv = [sys.executable, "-m", "bnaudit", "recalibrate", SORTED[0], "--model", "fixtures/digits.py:build_model",
            "--data", f"{data}:calibration_data", "--max-batches", "2", "--dry-run", "--format", "json"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, cwd=ROOT, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.rstrip().endswith(b"}")  # the whole JSON report
    assert marker.read_text() == "exit handler ran"
