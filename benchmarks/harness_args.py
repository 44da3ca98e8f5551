"""The harness benchmarks that score KV formats on a model read through transformers
(benchmarks/code_widths.py, key_scaling.py, partial_key_bits.py, scale_only_codes.py,
channel_keys.py, key_means.py, row_clips.py, outlier_rows.py): their command-line flags, and for
those that score perplexity and passkey retrieval against BF16, the scoring and its table."""

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from benchmarks.cli_args import choice_list, parse_int_list
from benchmarks.paths import DEFAULT_RESULTS_DIR
from benchmarks.records import markdown_table
from oscar_sglang.calibration.datasets import resolve_data, token_stream
from oscar_sglang.calibration.harness import RetrievalSettings, evaluate, machine
from oscar_sglang.calibration.kv_formats import Int2Format, KVFormat
from oscar_sglang.calibration.models import geometry, load_model
from oscar_sglang.calibration.retrieval import PROMPT_STYLES, TASKS, Proportion
from oscar_sglang.kernels.rotation_file import load_rotations


def add_harness_args(p) -> None:
    """--model, --gguf-file, --data, --device; the retrieval prompts (--lengths, --trials,
    --haystack-offset, --prompt-style); where the report goes (--out-dir, --name)."""
    p.add_argument("--model", required=True, help="as `oscar-sglang evaluate --model`")
    p.add_argument("--gguf-file")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", type=parse_int_list, default=[2048], help="retrieval prompt lengths (default 2048)")
    p.add_argument("--trials", type=int, default=40, help="prompts per task and length (default %(default)s)")
    p.add_argument("--haystack-offset", type=int, default=40000, help="haystacks start here (default %(default)s)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="chat")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    p.add_argument("--name", help="report stem (default: the model name, lower case)")


def add_scoring_args(p) -> None:
    """What score_formats reads besides add_harness_args: the held-out text (--seq-len,
    --sequences, --offset-tokens) and the retrieval tasks (--tasks)."""
    p.add_argument("--tasks", type=choice_list(TASKS, "tasks"), default=["passkey"],
                   help=f"comma list of retrieval tasks, of {','.join(TASKS)} (default passkey)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--sequences", type=int, default=2, help="held-out sequences for perplexity (default %(default)s)")
    p.add_argument("--offset-tokens", type=int, default=40000)


def simulation_parser(doc: str, rotations_help: str) -> argparse.ArgumentParser:
    """The parser of a simulation scored with score_beside_served: its description (the first
    paragraph of `doc`), add_harness_args, --rotations and add_scoring_args; the script adds its
    own flags."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_harness_args(p)
    p.add_argument("--rotations", required=True, help=rotations_help)
    add_scoring_args(p)
    return p


def model_and_rotations(args):
    """(model, tokenizer, model name, Geometry, RotationSet) of --model and --rotations, checked to
    belong together."""
    model, tokenizer, name = load_model(args.model, args.gguf_file, args.device)
    geo = geometry(model.config)
    rotations = load_rotations(args.rotations)
    rotations.check_matches(geo.num_layers, geo.num_kv_heads, geo.head_dim, model=name)
    return model, tokenizer, name, geo, rotations


def score_formats(model, tokenizer, formats, stream: torch.Tensor, args) -> list[dict]:
    """`harness.evaluate`'s rows for `formats` (the first one BF16) with this parser's flags:
    perplexity, KL and top-1 against BF16 on args.sequences × args.seq_len tokens of `stream`
    from args.offset_tokens, and retrieval (args.tasks at args.lengths) for all of them."""
    settings = RetrievalSettings(tuple(args.tasks), tuple(args.lengths), args.trials, args.haystack_offset,
                                 args.prompt_style)
    with torch.inference_mode():
        results = evaluate(model, tokenizer, formats, stream, seq_len=args.seq_len, sequences=args.sequences,
                           offset=args.offset_tokens, retrieval=settings)
    return [r.row() for r in results]


def formats_table(rows: list[dict], tasks, lengths, first_header: str) -> str:
    """Markdown: per row its bits, perplexity (Δ against the first row), KL, top-1 and each
    task's rate at each length with its Wilson interval."""
    reference = rows[0]["perplexity"]
    columns = [(task, n) for task in tasks for n in lengths]

    def rate(row, task, n):
        outcome = row["retrieval"].get(task, {}).get(str(n))
        return Proportion(outcome["successes"], outcome["trials"]).text() if outcome else "—"

    return markdown_table(
        [first_header, "bits/elem", "ppl (Δ)", "KL vs BF16", "top-1 vs BF16"] + [f"{t}@{n}" for t, n in columns],
        [[r["format"], f"{r['bits_per_element']:.2f}", f"{r['perplexity']:.3f} ({r['perplexity'] - reference:+.3f})",
          f"{r['kl_vs_bf16']:.4f}", f"{100 * r['top1_agreement']:.1f} %"] + [rate(r, t, n) for t, n in columns]
         for r in rows])


def write_formats_report(args, argv, benchmark: str, model_name: str, rows: list[dict], first_header: str,
                         notes: list[str], **fields) -> None:
    """<out-dir>/<benchmark, dashed>-<name>.json (the rows with the command, the machine and
    `fields`) and .md (formats_table, `notes`, the command and the machine), printed too."""
    report = {"benchmark": benchmark, "model": model_name, "machine": machine(args.device),
              "command": shlex.join(["python", "-m", f"benchmarks.{benchmark}", *(sys.argv[1:] if argv is None else argv)]),
              **fields, "results": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{benchmark.replace('_', '-')}-{args.name or model_name.lower()}.json"
    path.write_text(json.dumps(report, indent=1))
    text = "\n".join([formats_table(rows, args.tasks, args.lengths, first_header), "", *notes, f"command: `{report['command']}`",
                      f"machine: {report['machine']}"])
    path.with_suffix(".md").write_text(text + "\n")
    print(text)


def score_beside_served(args, argv, benchmark: str, first_header: str, variants, ignored: str, **fields) -> None:
    """Score BF16, the served format at --rotations' key width (the control) and
    `variants(rotations, head_dim)` (a list of formats) with score_formats; write the report,
    noting what of the rotation file the variants ignore."""
    model, tokenizer, name, geo, rotations = model_and_rotations(args)
    control = Int2Format(f"served k{rotations.key_bits}v2 (control)", rotations, geo.head_dim,
                         key_bits=rotations.key_bits)
    formats = [KVFormat(), control, *variants(rotations, geo.head_dim)]
    rows = score_formats(model, tokenizer, formats, token_stream(tokenizer, resolve_data(args.data)), args)
    write_formats_report(args, argv, benchmark, name, rows, first_header,
                         [f"rotations: {args.rotations} ({rotations.metadata.get('calibration_source')}, "
                          f"{rotations.key_bits}-bit keys); {ignored}"],
                         rotations=dict(rotations.metadata), **fields)
