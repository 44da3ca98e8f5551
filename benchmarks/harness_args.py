"""Command-line flags of the harness benchmarks that score passkey retrieval on a model read
through transformers (benchmarks/code_widths.py, benchmarks/partial_key_bits.py)."""

from pathlib import Path

from benchmarks.cli_args import parse_int_list
from benchmarks.paths import DEFAULT_RESULTS_DIR
from oscar_sglang.calibration.retrieval import PROMPT_STYLES


def add_harness_args(p) -> None:
    """--model, --gguf-file, --data, --device; the passkey prompts (--lengths, --trials,
    --haystack-offset, --prompt-style); where the report goes (--out-dir, --name)."""
    p.add_argument("--model", required=True, help="as `oscar-sglang evaluate --model`")
    p.add_argument("--gguf-file")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", type=parse_int_list, default=[2048], help="passkey prompt lengths (default 2048)")
    p.add_argument("--trials", type=int, default=40, help="passkey prompts per length (default %(default)s)")
    p.add_argument("--haystack-offset", type=int, default=40000, help="haystacks start here (default %(default)s)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="chat")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    p.add_argument("--name", help="report stem (default: the model name, lower case)")
