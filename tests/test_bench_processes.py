"""CPU tests of benchmarks/processes.py: a managed process is stopped with its whole process group,
dies with the benchmark that started it and runs with GPU_ENV set; exit codes, time-outs and a
server that exits before it answers.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import processes


def test_managed_process_stops_the_whole_group(tmp_path):
    start = time.monotonic()
    with processes.managed_process(["bash", "-c", "sleep 60 & sleep 60 & wait"], tmp_path / "p.log") as proc:
        time.sleep(0.3)
        assert len(processes.group_members(proc.pid)) >= 3
    assert processes.group_members(proc.pid) == []
    assert time.monotonic() - start < 10


def test_run_logged_times_out_and_reports_exit_codes(tmp_path):
    assert processes.run_logged(["bash", "-c", "echo hi; exit 3"], tmp_path / "a.log", 30) == 3
    assert (tmp_path / "a.log").read_text() == "hi\n"
    assert processes.run_logged(["sleep", "30"], tmp_path / "b.log", 1) is None


def test_wait_for_http_ok_fails_fast_when_the_server_dies(tmp_path):
    proc = subprocess.Popen(["bash", "-c", "exit 2"])
    proc.wait()
    with pytest.raises(RuntimeError, match="exited with code 2"):
        processes.wait_for_http_ok(f"http://127.0.0.1:{processes.free_port()}/health", proc, 30)


def test_children_die_with_the_benchmark(tmp_path):
    """A child of managed_process gets SIGTERM when the process that started it is killed."""
    script = (
        "import sys, time\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from benchmarks import processes\n"
        "with processes.managed_process(['sleep', '60'], sys.argv[2]) as proc:\n"
        "    print(proc.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    driver = subprocess.Popen(
        [sys.executable, "-c", script, repo, str(tmp_path / "s.log")], stdout=subprocess.PIPE
    )
    child = int(driver.stdout.readline())
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 5
    while processes.group_members(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes.group_members(child) == []


def test_children_get_the_gpu_environment(tmp_path):
    script = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {list(processes.GPU_ENV)!r}}}))"
    assert processes.run_logged([sys.executable, "-c", script], tmp_path / "env.log", 30) == 0
    assert json.loads((tmp_path / "env.log").read_text()) == processes.GPU_ENV
