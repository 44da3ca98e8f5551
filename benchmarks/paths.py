"""Where the benchmarks run and write: the repository root (every child process's working
directory, and where the shared models folder is looked for), the default results folder and
the default work folder for prepared model folders.
"""

import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "oscar-bench"
