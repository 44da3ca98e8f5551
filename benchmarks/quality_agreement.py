"""Does the accuracy harness predict the server? Compares, prompt by prompt, the retrieval outcomes
of `oscar-sglang evaluate` (accuracy-NAME.json) with the cold-prefill outcomes of
benchmarks/quality_server.py (quality-server-NAME.json) on the same prompts.

Both tools build their prompts with calibration.retrieval from the settings recorded in their
JSON; equal settings give equal token ids, and outcomes are listed in the same order (task, then
length, then trial), so the i-th outcomes of a task and length answer the same prompt. Formats
are paired with server configurations by --pairs FORMAT=CONFIG (default: bf16, fp8, oscar,
oscar-output-error and oscar-peak-kl by name, int2-hadamard with oscar-data-free).

Per pair, task and length: both rates with Wilson 95 % intervals, whether the intervals overlap,
and the share of prompts on which both tools gave the same verdict. Writes NAME.md and NAME.json.

    python -m benchmarks.quality_agreement --harness benchmarks/results/accuracy-smol-hf.json \\
        --server benchmarks/results/quality-server-smol-hf.json
"""

import argparse
import json
from pathlib import Path

from oscar_sglang.calibration.harness import RetrievalSettings
from oscar_sglang.calibration.retrieval import Proportion

DEFAULT_PAIRS = ("bf16=bf16", "fp8=fp8", "oscar=oscar", "int2-hadamard=oscar-data-free",
                 "oscar-output-error=oscar-output-error", "oscar-peak-kl=oscar-peak-kl")
SETTING_FIELDS = tuple(RetrievalSettings.__dataclass_fields__)


class AgreementError(ValueError):
    """Inputs that cannot be compared; the message says why."""


def check_same_prompts(harness: dict, server: dict) -> None:
    """The two runs built the same prompts for the (task, length) pairs they share: every
    RetrievalSettings field but the task and length lists equal."""
    ours, theirs = harness["config"]["retrieval"], server["settings"]
    differ = [f for f in SETTING_FIELDS if f not in ("tasks", "lengths")
              and list_or_value(ours[f]) != list_or_value(theirs[f])]
    if differ:
        raise AgreementError("the runs built different prompts: "
                             + ", ".join(f"{f} {ours[f]!r} (harness) vs {theirs[f]!r} (server)" for f in differ))


def list_or_value(x):
    return list(x) if isinstance(x, (list, tuple)) else x


def compare(harness: dict, server: dict, pairs: list[tuple[str, str]]) -> list[dict]:
    """One row per (format, config, task, length) present in both runs."""
    check_same_prompts(harness, server)
    formats = {r["format"]: r for r in harness["results"]}
    rows = []
    for fmt, config in pairs:
        record = server["configs"].get(config, {})
        if fmt not in formats or record.get("status") != "ok":
            continue
        for task, by_length in formats[fmt]["retrieval"].items():
            served = record.get("retrieval", {}).get(task, {}).get("cold", {}).get("outcomes", [])
            for length, p in by_length.items():
                theirs = [o["correct"] for o in served if str(o["length"]) == length]
                if not theirs:
                    continue
                ours = p["outcomes"]
                if len(theirs) != len(ours):
                    raise AgreementError(f"{config} {task}@{length}: {len(theirs)} server outcomes, "
                                         f"{len(ours)} in the harness")
                a, b = Proportion(sum(ours), len(ours)), Proportion(sum(theirs), len(theirs))
                (a_lo, a_hi), (b_lo, b_hi) = a.interval(), b.interval()
                rows.append({"format": fmt, "config": config, "task": task, "length": int(length),
                             "harness": a.as_dict(), "server": b.as_dict(),
                             "intervals_overlap": a_lo <= b_hi and b_lo <= a_hi,
                             "same_verdict": sum(x == y for x, y in zip(ours, theirs)) / len(ours)})
    return rows


def markdown(rows: list[dict], harness_path: str, server_path: str) -> str:
    head = "| format | server config | task | length | harness | server | intervals overlap | same verdict |"
    lines = [head, "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['config']} | {r['task']} | {r['length']} | "
                     f"{Proportion(r['harness']['successes'], r['harness']['trials']).text()} | "
                     f"{Proportion(r['server']['successes'], r['server']['trials']).text()} | "
                     f"{'yes' if r['intervals_overlap'] else 'NO'} | {100 * r['same_verdict']:.0f} % |")
    overlap = sum(r["intervals_overlap"] for r in rows)
    verdict = sum(r["same_verdict"] for r in rows) / len(rows) if rows else float("nan")
    lines += ["", f"Intervals overlap in {overlap} of {len(rows)} rows; the two tools give the same "
              f"verdict on {100 * verdict:.1f} % of prompts (mean over rows).", "",
              f"Harness: `{harness_path}`; server: `{server_path}` (cold prefill)."]
    return "\n".join(lines)


def pair(text: str) -> tuple[str, str]:
    fmt, sep, config = text.partition("=")
    if not sep or not fmt or not config:
        raise argparse.ArgumentTypeError(f"pairs are FORMAT=CONFIG, got {text!r}")
    return fmt, config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--harness", required=True, help="accuracy-NAME.json of `oscar-sglang evaluate`")
    p.add_argument("--server", required=True, help="quality-server-NAME.json of benchmarks.quality_server")
    p.add_argument("--pairs", type=pair, nargs="+", default=[pair(x) for x in DEFAULT_PAIRS],
                   metavar="FORMAT=CONFIG", help=f"default: {' '.join(DEFAULT_PAIRS)}")
    p.add_argument("--out", help="output stem (default: quality-agreement-<server stem suffix> beside --server)")
    args = p.parse_args(argv)
    harness, server = (json.loads(Path(x).read_text()) for x in (args.harness, args.server))
    try:
        rows = compare(harness, server, args.pairs)
    except AgreementError as e:
        raise SystemExit(f"quality_agreement: error: {e}") from e
    out = Path(args.out or Path(args.server).with_name(
        Path(args.server).stem.replace("quality-server", "quality-agreement")))
    text = markdown(rows, args.harness, args.server)
    out.with_suffix(".json").write_text(json.dumps({"harness": args.harness, "server": args.server,
                                                   "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
