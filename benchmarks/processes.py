"""Processes the benchmarks start: every child runs in its own process group with GPU_ENV set, is
stopped with its whole group when its block ends, fails or times out, and gets SIGTERM if the
benchmark itself dies (even by SIGKILL); also waiting for a server to answer, free ports, and
reading what a child wrote (log tails, JSON lines).

SGLang's own helpers do not fit here: `sglang.srt.utils.kill_process_tree` sends SIGKILL at once to
the children psutil still finds under the server, and `sglang.test.test_utils.popen_launch_server`
starts the server outside a process group of its own and without a parent-death signal. The
benchmarks start servers one after another on one GPU, so each stop must give the server a grace
period and return only once every process it started has exited and freed its GPU memory.
"""

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks.paths import REPO_ROOT

# Set for every process the benchmarks start: NVLink multicast stays off on the lent machines.
GPU_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def child_env():
    """Environment for every process the benchmarks start."""
    return {**os.environ, **GPU_ENV, "PYTHONUNBUFFERED": "1"}


def free_port():
    """A TCP port that is free right now on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_members(pgid):
    """Pids of the live (not zombie) processes in process group `pgid`, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            state, _ppid, pgrp = text[text.rindex(")") + 2 :].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                members.append(int(stat.parent.name))
    return members


def stop_process_group(proc, grace=30.0):
    """Stop `proc` and everything in its process group: SIGTERM, then SIGKILL after `grace` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.poll() is not None and not group_members(proc.pid):
            return


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent():
    """Run in the child before exec: SIGTERM it when the benchmark dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def managed_process(cmd, log_path):
    """Start `cmd` in a new process group with output to `log_path`; stop the group on exit."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(),
            cwd=REPO_ROOT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            yield proc
        finally:
            stop_process_group(proc)


def run_logged(cmd, log_path, timeout):
    """Run `cmd` to completion with output to `log_path`; its exit code, or None on timeout."""
    with managed_process(cmd, log_path) as proc:
        try:
            return proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            return None


def wait_for_http_ok(url, proc, timeout):
    """Poll `url` until it answers 200; raise if `proc` exits first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {url} answered")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def raise_keyboard_interrupt_on_sigterm():
    """Turn SIGTERM (e.g. from `timeout`) into KeyboardInterrupt so cleanup blocks run."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def log_tail(path, lines=40):
    """The last `lines` lines of a text file ('' if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def read_jsonl(path):
    """The JSON objects of a JSON-lines file ([] if it does not exist).

    A line that does not parse (a writer killed mid-line) is left out.
    """
    path = Path(path)
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records
