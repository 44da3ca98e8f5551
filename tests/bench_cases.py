"""Helpers shared by the CPU tests of the serving and latency benchmarks (test_bench_*.py): the
model folder their commands name (never read: nothing is served), picking flags out of a command
line, and a serving results record.
"""

from pathlib import Path

MODEL = Path("/models/qwen3-8b-dummy")


def without(cmd, flags):
    """`cmd` with the first occurrence of the contiguous sub-list `flags` removed."""
    for i in range(len(cmd) - len(flags) + 1):
        if cmd[i : i + len(flags)] == flags:
            return cmd[:i] + cmd[i + len(flags) :]
    raise AssertionError(f"{flags} not in {cmd}")


def flag_value(cmd, flag):
    """The argument that follows `flag` in `cmd`."""
    return cmd[cmd.index(flag) + 1]


def serving_record(status, **metrics):
    """A configuration's record in a serving results document."""
    return {"status": status, "metrics": metrics}
