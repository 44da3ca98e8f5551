"""Server quality benchmark: KV-cache quality measured through real SGLang servers over HTTP.

For every configuration one stock SGLang server is started (`python -m sglang.launch_server`
with the real checkpoint of --model-path; identical flags except the KV option), measured, and
stopped before the next one starts. Configurations: bf16 (the reference, always first), fp8,
oscar (the calibrated --rotations artifact), oscar-data-free (data-free rotations, asked for
explicitly), and one oscar-LABEL per --oscar-variant LABEL=PATH.

Every request is a POST /generate with `input_ids` (token ids built once, before the first
server starts, so every configuration gets the same ids) and greedy sampling, sent from a pool
of client threads. Prefill runs in chunks of --chunked-prefill-size tokens, so later chunks of a
long prompt read the earlier ones back from the KV cache, as in serving. Phases, in order:

1. retrieval (calibration.retrieval: passkey, multi-needle-one, multi-needle-all, built from the
   held-out text as `oscar-sglang evaluate` builds them): `cold` after a cache flush (one per
   prompt length); `radix` with every prompt's context cached first by a request of its own
   (1 new token), then the full prompt sent, so its context is read from the radix cache
   (meta_info cached_tokens shows it), in groups of prompts whose contexts all fit the KV pool;
2. multi-turn: conversations whose facts arrive in the first user turn; every later request is
   the previous one plus the model's reply plus the next turn (a radix hit, as in a chat), the
   last one asks for a fact;
3. greedy agreement: continuations of windows of held-out text, compared token by token with
   BF16's (index of the first differing token; share of continuations identical throughout);
4. perplexity of windows of held-out text from the prompt logprobs (positions >= --ppl-from).

Retrieval rates carry Wilson 95 % intervals. Results are written after every phase:
<out-dir>/<name>.json (command, machine, the settings that rebuild the prompts, per configuration
its server command and flags, bits per KV element and per-prompt outcomes with the generated ids),
<name>.md (one table) and <name>.png (retrieval rate against prompt length). A configuration that
fails (start-up, a request) is recorded with its error and server-log tail, and the next one runs.

Run from the repository root on the GPU machine:

    python -m benchmarks.quality_server --model-path /models/Qwen3-8B \\
        --rotations qwen3-8b.oscar.safetensors
    python -m benchmarks.quality_server --model-path /models/Qwen3-8B --configs bf16,oscar \\
        --rotations a.oscar.safetensors --oscar-variant clip90=b.oscar.safetensors
"""

import argparse
import json
import math
import re
import shlex
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchmarks.cli_args import flag_list, int_at_least, kv_flags, parse_int_list, positive_int
from benchmarks.paths import DEFAULT_RESULTS_DIR
from benchmarks.processes import (
    free_port,
    log_tail,
    managed_process,
    raise_keyboard_interrupt_on_sigterm,
    wait_for_http_ok,
)
from benchmarks.records import machine_info, markdown_table, now_iso, write_results
from oscar_sglang.calibration.datasets import DataError, resolve_data, token_stream
from oscar_sglang.calibration.harness import RetrievalSettings
from oscar_sglang.calibration.retrieval import (
    PROMPT_STYLES,
    TASKS,
    Conversation,
    PromptBuilder,
    Proportion,
    RetrievalPrompt,
    correct,
    depths,
)
from oscar_sglang.config import DATA_FREE_ROTATIONS  # the --oscar-rotations value asking for them
from oscar_sglang.kernels.format import OscarFormat

BENCHMARK = "quality_server"
HOST = "127.0.0.1"
REFERENCE = "bf16"
BUILTIN_CONFIGS = ("bf16", "fp8", "oscar", "oscar-data-free")
DEFAULT_CONFIGS = ",".join(BUILTIN_CONFIGS)
VARIANT_PREFIX = "oscar-"
LABEL_RE = re.compile(r"[A-Za-z0-9._-]+")
BITS = {"bf16": 16.0, "fp8": 8.0}

WORKERS = 32  # client threads: requests in flight at once
REPLY_TOKENS = 16  # the model's reply to each multi-turn user turn
REQUEST_TIMEOUT_S = 1800.0  # one /generate: a long prompt queued behind 31 others still answers
FLUSH_WAIT_S = 60  # /flush_cache?timeout=: the server flushes once idle, waiting this long
# Share of the KV pool (tokens) that the prompts of one radix group, or the conversations in
# flight, may fill: their cached contexts must all stay in the pool until they are read back.
CACHE_SHARE = 0.7

# The OSCAR pool's start-up log line (oscar_sglang/sizing.py)
OSCAR_BITS_RE = re.compile(r"OSCAR-2 KV cache: ([\d.]+) bits/element")
# SGLang 0.5.17's scheduler start-up line (scheduler.py), should /server_info lack the pool size
POOL_RE = re.compile(r"max_total_num_tokens=(\d+)")


# ---------------------------------------------------------------------------- configurations


def oscar_flags(rotations):
    """Flags of an OSCAR configuration reading `rotations` (a file, made absolute since the
    server runs in the repository root and serves the key width it was calibrated for; or
    DATA_FREE_ROTATIONS)."""
    if str(rotations) == DATA_FREE_ROTATIONS:
        return ["--kv-quant", "oscar", "--oscar-rotations", DATA_FREE_ROTATIONS]
    if not Path(rotations).is_file():
        raise ValueError(f"rotation file {rotations} does not exist")
    return ["--kv-quant", "oscar", "--oscar-rotations", str(Path(rotations).resolve())]


def config_flags(configs, rotations=None, variants=()):
    """The KV flags of every configuration, in run order: `configs` (names from --configs), then
    one oscar-LABEL per (LABEL, PATH) of `variants` not already named there. Raises ValueError
    for an unknown or repeated name, a missing rotation file, `oscar` without `rotations`, or a
    first configuration other than bf16 (the others are compared with its continuations)."""
    variant_paths = {}
    for label, path in variants:
        name = VARIANT_PREFIX + label
        if name in BUILTIN_CONFIGS or name in variant_paths:
            raise ValueError(f"--oscar-variant {label}= gives configuration {name}, which exists already")
        variant_paths[name] = path
    names = list(configs) + [name for name in variant_paths if name not in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"a configuration is listed twice in {','.join(names)}")
    if not names or names[0] != REFERENCE:
        raise ValueError(f"the first configuration must be {REFERENCE} (greedy agreement is measured "
                         f"against its continuations); got {','.join(names) or 'none'}")
    flags = {}
    for name in names:
        if name == "bf16":
            flags[name] = kv_flags("bf16-flashinfer")
        elif name == "fp8":
            flags[name] = kv_flags("fp8-flashinfer")
        elif name == "oscar":
            if rotations is None:
                raise ValueError("configuration oscar needs --rotations PATH (the calibrated artifact)")
            flags[name] = oscar_flags(rotations)
        elif name == "oscar-data-free":
            flags[name] = oscar_flags(DATA_FREE_ROTATIONS)
        elif name in variant_paths:
            flags[name] = oscar_flags(variant_paths[name])
        else:
            raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(BUILTIN_CONFIGS)} "
                             f"or add one with --oscar-variant LABEL=PATH")
    return flags


def server_command(args, model_path, port, kv):
    """The launch_server command of one configuration; only `kv` differs between them. The
    radix cache stays on (the radix and multi-turn phases read from it)."""
    return [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", str(model_path),
        "--host", HOST,
        "--port", str(port),
        "--context-length", str(args.context_length),
        "--chunked-prefill-size", str(args.chunked_prefill_size),
        "--mem-fraction-static", str(args.mem_fraction_static),
        # short start-up: decode graphs up to the client's concurrency only, no prefill graphs
        # (an OSCAR server turns those off itself), no warm-up request (/health_generate runs one)
        "--cuda-graph-max-bs-decode", str(WORKERS),
        "--cuda-graph-backend-prefill", "disabled",
        "--skip-server-warmup",
        *args.extra_server_args,
        *kv,
    ]  # fmt: skip


def model_head_dim(model_path):
    """head_dim of the checkpoint's config.json (text_config for multimodal ones), or None."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    config = config.get("text_config", config)
    if config.get("head_dim"):
        return config["head_dim"]
    if config.get("hidden_size") and config.get("num_attention_heads"):
        return config["hidden_size"] // config["num_attention_heads"]
    return None


def bits_per_element(name, log_text, head_dim):
    """Bits per stored K or V element: 16 (bf16), 8 (fp8); an OSCAR server's from its start-up
    log line, else from OscarFormat(head_dim) with its default group size."""
    if name in BITS:
        return BITS[name]
    found = OSCAR_BITS_RE.findall(log_text)
    if found:
        return float(found[-1])
    return OscarFormat(head_dim).bits_per_element if head_dim else None


# ---------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Window:
    """`ids`: held-out tokens from token `start` of the data stream."""

    start: int
    ids: list[int]


@dataclass(frozen=True)
class Workload:
    """Every prompt the benchmark sends; built once, so each configuration gets the same ids."""

    retrieval: dict[str, list[RetrievalPrompt]]  # task -> prompts, lengths ascending
    conversations: list[Conversation]
    agreement: list[Window]
    perplexity: list[Window]


def held_out_windows(stream, offset, length, count):
    """`count` windows of `length` tokens of stream[offset:], spread evenly over it (the first at
    its start, the last at its end), so that they do not overlap."""
    if count == 0:
        return []
    available = stream.numel() - offset
    if count * length > available:
        raise DataError(f"{count} windows of {length} tokens need {count * length} tokens after offset "
                        f"{offset}; the data has {available}; pass more --data or fewer tokens")
    step = (available - length) / max(count - 1, 1)
    starts = [offset + round(i * step) for i in range(count)]
    return [Window(start, stream[start:start + length].tolist()) for start in starts]


def build_workload(args, tokenizer, stream):
    """The prompts of every phase from the token stream [N] of the --data text."""
    if args.offset_tokens >= stream.numel():
        raise DataError(f"--offset-tokens {args.offset_tokens} is past the end of the data "
                        f"({stream.numel()} tokens)")
    haystack = stream[args.offset_tokens:]

    def builder():
        return PromptBuilder(tokenizer, haystack, args.prompt_style, args.needles, args.seed)

    # a (task, length)'s prompts depend only on the settings (PromptBuilder.build): the same ids
    # `oscar-sglang evaluate` scores with equal settings, prompt by prompt
    tasks = builder()
    retrieval = {task: tasks.build(task, args.lengths, args.trials) for task in args.tasks}
    # a builder of their own: the conversations do not depend on which tasks are run
    talk = builder()
    conversations = [talk.conversation(i, args.turns, args.turn_length, depth)
                     for i, depth in enumerate(depths(args.conversations))] if args.conversations else []
    return Workload(
        retrieval, conversations,
        held_out_windows(stream, args.offset_tokens, args.agreement_length, args.agreement_prompts),
        held_out_windows(stream, args.offset_tokens, args.ppl_length, args.ppl_sequences),
    )  # fmt: skip


def conversation_tokens(conversation):
    """Tokens of a conversation's last request and its answer (replies at their longest)."""
    return (sum(map(len, conversation.turns)) + len(conversation.turns) * REPLY_TOKENS
            + len(conversation.question) + len(conversation.answer))


def longest_request(workload, agreement_tokens):
    """Tokens of the longest request of the workload, generated tokens included."""
    sizes = [len(p.prompt) + len(p.answer) for prompts in workload.retrieval.values() for p in prompts]
    sizes += [conversation_tokens(c) for c in workload.conversations]
    sizes += [len(w.ids) + agreement_tokens for w in workload.agreement]
    sizes += [len(w.ids) + 1 for w in workload.perplexity]
    return max(sizes, default=0)


# ---------------------------------------------------------------------------- client


def generate_body(ids, new_tokens, *, ignore_eos=False, logprobs=False):
    """/generate body: greedy decoding of up to `new_tokens` tokens after the token ids `ids`
    (exactly that many with `ignore_eos`); `logprobs` adds the log-probability of every prompt
    token (meta_info input_token_logprobs)."""
    body = {"input_ids": list(ids),
            "sampling_params": {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": ignore_eos}}
    if logprobs:
        body.update(return_logprob=True, logprob_start_len=0)
    return body


class Client:
    """JSON over HTTP to the SGLang server on HOST:`port`."""

    def __init__(self, port, timeout=REQUEST_TIMEOUT_S):
        self.base, self.timeout = f"http://{HOST}:{port}", timeout

    def _call(self, path, body=None):
        """The answer's body; POST with `body` as JSON, GET without. HTTP errors raise
        RuntimeError with the server's message."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method="GET" if body is None else "POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            message = exc.read().decode(errors="replace").strip()
            raise RuntimeError(f"{request.method} {path}: HTTP {exc.code}: {message[:1000]}") from None

    def generate(self, body):
        """The /generate answer: output_ids (generated token ids, a stop token included) and
        meta_info (cached_tokens, finish_reason, input_token_logprobs when asked for)."""
        return json.loads(self._call("/generate", body))

    def flush(self):
        """Empty the radix cache (the server waits until no request runs)."""
        self._call(f"/flush_cache?timeout={FLUSH_WAIT_S}", {})

    def server_info(self):
        return json.loads(self._call("/server_info"))


def gather(fn, items, workers=WORKERS):
    """[fn(item) for item in items] on `workers` threads, in order. The first failure is
    raised and the items not yet started are dropped."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def pool_tokens(client, log_text):
    """KV pool size in tokens: /server_info's max_total_num_tokens, else the start-up log's."""
    tokens = client.server_info().get("max_total_num_tokens")
    if tokens is None:
        found = POOL_RE.findall(log_text)
        if not found:
            raise RuntimeError("the server reports no KV pool size (max_total_num_tokens)")
        tokens = found[-1]
    return int(tokens)


# ---------------------------------------------------------------------------- phases


def outcome(prompt, response):
    """One prompt's result: where its fact sat, whether the greedy continuation starts with the
    answer, the generated ids, and how many prompt tokens came from the radix cache."""
    generated = response["output_ids"]
    return {"length": prompt.length, "depth": prompt.depth, "correct": correct(prompt, generated),
            "generated": generated, "prompt_tokens": len(prompt.prompt),
            "cached_tokens": response["meta_info"]["cached_tokens"]}


def cached_fraction(outcomes):
    """Mean share of the prompt tokens served from the radix cache (None without outcomes)."""
    if not outcomes:
        return None
    return sum(o["cached_tokens"] / o["prompt_tokens"] for o in outcomes) / len(outcomes)


def scores(outcomes):
    """{length: Proportion of correct outcomes}, lengths ascending."""
    lengths = sorted({o["length"] for o in outcomes})
    return {n: Proportion(sum(o["correct"] for o in outcomes if o["length"] == n),
                          sum(o["length"] == n for o in outcomes)) for n in lengths}


def summarize(outcomes):
    """A retrieval phase's record: rates and cached fraction per length (JSON keys are the
    lengths as strings) and the outcomes, in prompt order."""
    rates = scores(outcomes)
    return {
        "scores": {str(n): p.as_dict() for n, p in rates.items()},
        "cached_fraction": {str(n): cached_fraction([o for o in outcomes if o["length"] == n]) for n in rates},
        "outcomes": outcomes,
    }


def ask(client, prompts, indices, outcomes):
    """prompts[i] for every i of `indices`, sent at once, scored into outcomes[i]."""
    responses = gather(lambda i: client.generate(generate_body(prompts[i].prompt, len(prompts[i].answer))), indices)
    for i, response in zip(indices, responses):
        outcomes[i] = outcome(prompts[i], response)


def cold_phase(client, prompts):
    """Every prompt with only the shared instructions in the cache: a flush before each length,
    since trial t reads its haystack from the same offset at every length (so its shorter prompt
    would share the longer one's text up to the first fact)."""
    outcomes = [None] * len(prompts)
    for length in sorted({p.length for p in prompts}):
        client.flush()
        ask(client, prompts, [i for i, p in enumerate(prompts) if p.length == length], outcomes)
    return summarize(outcomes)


def radix_groups(sizes, capacity):
    """Consecutive index groups whose `sizes` sum to at most `capacity` (a larger size alone)."""
    groups, total = [], 0
    for i, size in enumerate(sizes):
        if not groups or total + size > capacity:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def radix_phase(client, prompts, capacity):
    """Every prompt with its context cached first: per group of prompts that fit `capacity`
    tokens, a flush, every context (1 new token, which caches it), then every full prompt."""
    groups = radix_groups([len(p.prompt) + len(p.answer) for p in prompts], capacity)
    outcomes = [None] * len(prompts)
    for group in groups:
        client.flush()
        gather(lambda i: client.generate(generate_body(prompts[i].context, 1)), group)
        ask(client, prompts, group, outcomes)
    return {**summarize(outcomes), "groups": len(groups)}


def reply_ids(response):
    """The generated ids without the stop token that ended them, if one did: the next user turn
    starts with the chat frame's end of the reply, as a chat client renders the history."""
    ids = list(response["output_ids"])
    reason = response["meta_info"].get("finish_reason") or {}
    if reason.get("type") == "stop" and ids and ids[-1] == reason.get("matched"):
        ids.pop()
    return ids


def run_conversation(client, conversation):
    """Turn after turn, each request the previous one plus the reply plus the next turn, then
    the question; the outcome of the answer."""
    ids, replies = [], []
    for turn in conversation.turns:
        ids = ids + turn
        reply = reply_ids(client.generate(generate_body(ids, REPLY_TOKENS)))
        replies.append(reply)
        ids = ids + reply
    last = ids + conversation.question
    response = client.generate(generate_body(last, len(conversation.answer)))
    generated = response["output_ids"]
    return {"depth": conversation.depth, "correct": correct(conversation, generated), "generated": generated,
            "replies": replies, "prompt_tokens": len(last), "cached_tokens": response["meta_info"]["cached_tokens"]}


def multi_turn_phase(client, conversations, capacity):
    """The conversations after a cache flush, as many at once as fit `capacity` tokens (so that
    one's history is not evicted while another runs)."""
    workers = max(1, min(WORKERS, len(conversations), capacity // max(map(conversation_tokens, conversations))))
    client.flush()
    outcomes = gather(lambda c: run_conversation(client, c), conversations, workers)
    return {"score": Proportion(sum(o["correct"] for o in outcomes), len(outcomes)).as_dict(),
            "cached_fraction": cached_fraction(outcomes), "workers": workers, "outcomes": outcomes}


def first_divergence(generated, reference):
    """Index of the first token where `generated` differs from `reference`; the shorter length
    when one is a prefix of the other (so the full length when they are identical)."""
    for i, (ours, theirs) in enumerate(zip(generated, reference)):
        if ours != theirs:
            return i
    return min(len(generated), len(reference))


def agreement_summary(generated, reference):
    """Mean first divergence and share identical of continuations `generated` against the
    reference continuations of the same prompts."""
    divergences = [first_divergence(g, r) for g, r in zip(generated, reference, strict=True)]
    identical = Proportion(sum(g == r for g, r in zip(generated, reference)), len(generated))
    return {"first_divergence_mean": sum(divergences) / len(divergences), "identical": identical.as_dict(),
            "first_divergence": divergences}


def agreement_phase(client, windows, new_tokens, reference):
    """Greedy continuations of exactly `new_tokens` tokens of every window after a flush, and
    their agreement with `reference` (BF16's continuations; None: this is BF16, or its run has
    none)."""
    client.flush()
    responses = gather(lambda w: client.generate(generate_body(w.ids, new_tokens, ignore_eos=True)), windows)
    generated = [r["output_ids"] for r in responses]
    result = {"outcomes": [{"start": w.start, "generated": g} for w, g in zip(windows, generated)]}
    if reference is not None:
        result.update(agreement_summary(generated, reference))
    return result


def sequence_nll(entries, ids, start):
    """(summed negative log-likelihood, count) of ids[start:] from /generate's
    meta_info input_token_logprobs for prompt `ids` with logprob_start_len 0: entry j is
    [log p(ids[j] | ids[:j]), ids[j], text]; entry 0 has no log-probability."""
    if len(entries) != len(ids):
        raise RuntimeError(f"{len(entries)} input logprobs for a prompt of {len(ids)} tokens")
    start = max(start, 1)
    nll = 0.0
    for j in range(start, len(ids)):
        logprob, token = entries[j][0], entries[j][1]
        if token != ids[j]:
            raise RuntimeError(f"input logprob {j} is for token {token}, the prompt has {ids[j]}")
        nll -= logprob
    return nll, len(ids) - start


def perplexity(pairs):
    """exp of the mean NLL over every token of the (nll, count) pairs."""
    return math.exp(sum(nll for nll, _ in pairs) / sum(count for _, count in pairs))


def perplexity_phase(client, windows, start):
    """Perplexity of the windows' tokens at positions >= `start`, each window one request."""
    client.flush()
    responses = gather(lambda w: client.generate(generate_body(w.ids, 1, logprobs=True)), windows)
    pairs = [sequence_nll(r["meta_info"]["input_token_logprobs"], w.ids, start)
             for w, r in zip(windows, responses)]
    return {"ppl": perplexity(pairs), "tokens": sum(count for _, count in pairs),
            "per_sequence": [{"start": w.start, "ppl": perplexity([pair])} for w, pair in zip(windows, pairs)]}


def measure(client, workload, args, reference, record, save):
    """Every phase against one running server, into `record`; save() after each phase."""
    capacity = int(CACHE_SHARE * record["kv_pool_tokens"])

    def phase(title, run, place, key):
        """place[key] = run(), with its seconds; saved and printed."""
        started = time.monotonic()
        place[key] = result = run()
        result["seconds"] = round(time.monotonic() - started, 1)
        save()
        print(f"   {title}: {phase_line(result)} ({result['seconds']} s)", flush=True)

    retrieval = record.setdefault("retrieval", {})
    for task, prompts in workload.retrieval.items():
        results = retrieval.setdefault(task, {})
        phase(f"{task} cold", lambda: cold_phase(client, prompts), results, "cold")
        phase(f"{task} radix", lambda: radix_phase(client, prompts, capacity), results, "radix")
    if workload.conversations:
        phase("multi-turn", lambda: multi_turn_phase(client, workload.conversations, capacity), record, "multi_turn")
    if workload.agreement:
        phase("agreement", lambda: agreement_phase(client, workload.agreement, args.agreement_tokens, reference),
              record, "agreement")
    if workload.perplexity:
        phase("perplexity", lambda: perplexity_phase(client, workload.perplexity, args.ppl_from), record, "perplexity")


def phase_line(result):
    """A phase's result in a few words, for the progress output."""
    if "scores" in result:
        return ", ".join(f"{n}: {proportion(p).text()}" for n, p in result["scores"].items())
    if "score" in result:
        return proportion(result["score"]).text()
    if "ppl" in result:
        return f"ppl {result['ppl']:.3f}"
    if "first_divergence_mean" in result:
        return f"first divergence {result['first_divergence_mean']:.1f}"
    return "reference continuations"


# ---------------------------------------------------------------------------- one configuration


def run_config(name, kv, args, model_path, workload, reference, logs_dir, record, save):
    """Start `name`'s server, run every phase, stop it; fills `record` (status ok, failed or
    interrupted) and saves it as it goes."""
    port = args.port or free_port()
    log = Path(logs_dir) / f"{name}.server.log"
    cmd = server_command(args, model_path, port, kv)
    record.update(status="running", started=now_iso(), kv_flags=kv, server_command=shlex.join(cmd),
                  server_log=str(log))
    save()
    started = time.monotonic()
    try:
        with managed_process(cmd, log) as server:
            # /health_generate answers once the server has generated a token
            wait_for_http_ok(f"http://{HOST}:{port}/health_generate", server, args.startup_timeout)
            record["startup_s"] = round(time.monotonic() - started, 1)
            client = Client(port)
            log_text = log.read_text(errors="replace")
            record["kv_pool_tokens"] = pool_tokens(client, log_text)
            record["bits_per_element"] = bits_per_element(name, log_text, model_head_dim(model_path))
            save()
            measure(client, workload, args, reference, record, save)
        record["status"] = "ok"
    except KeyboardInterrupt:  # SIGTERM or Ctrl-C: the server is stopped, the record kept
        record.update(status="interrupted", error="benchmark stopped")
    except Exception as exc:  # any failure ends this configuration only; the next one runs
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    if record["status"] != "ok":
        record["server_log_tail"] = log_tail(log)
    record["elapsed_s"] = round(time.monotonic() - started, 1)
    save()


def reference_continuations(record):
    """BF16's agreement continuations from its record, or None if it has none."""
    outcomes = record.get("agreement", {}).get("outcomes")
    return [o["generated"] for o in outcomes] if outcomes else None


# ---------------------------------------------------------------------------- report


def proportion(d):
    """A Proportion from its as_dict() form."""
    return Proportion(d["successes"], d["trials"])


def percent(x):
    return None if x is None else f"{100 * x:.0f} %"


def radix_cached(record):
    """Mean cached share of every radix-phase prompt of the record, over all tasks."""
    outcomes = [o for phases in record.get("retrieval", {}).values()
                for o in phases.get("radix", {}).get("outcomes", [])]
    return cached_fraction(outcomes)


AGREEMENT_HEADERS = ("first diff. token", "identical to bf16")


def columns(settings):
    """(header, cell function of a record) of the table, for the phases the settings ran."""
    lengths, tasks = [str(n) for n in settings["lengths"]], settings["tasks"]

    def rate(task, phase, n):
        def cell(record):
            found = record.get("retrieval", {}).get(task, {}).get(phase, {}).get("scores", {}).get(n)
            return proportion(found).text() if found else None
        return cell

    def value(key, field, text):
        def cell(record):
            found = record.get(key, {}).get(field)
            return None if found is None else text(found)
        return cell

    cols = [("bits/elem", lambda r: None if r.get("bits_per_element") is None else f"{r['bits_per_element']:g}")]
    if "passkey" in tasks:
        cols += [(f"passkey cold {n}", rate("passkey", "cold", n)) for n in lengths]
        cols += [(f"passkey radix {n}", rate("passkey", "radix", n)) for n in lengths]
    if tasks:
        cols.append(("radix cached", lambda r: percent(radix_cached(r))))
    for task in ("multi-needle-one", "multi-needle-all"):
        if task in tasks:
            cols += [(f"{task} {n}", rate(task, "cold", n)) for n in lengths]
    if settings["conversations"]:
        cols += [("multi-turn", value("multi_turn", "score", lambda p: proportion(p).text())),
                 ("multi-turn cached", value("multi_turn", "cached_fraction", percent))]
    if settings["agreement_prompts"]:
        cols += [(AGREEMENT_HEADERS[0], value("agreement", "first_divergence_mean", lambda x: f"{x:.1f}")),
                 (AGREEMENT_HEADERS[1], value("agreement", "identical", lambda p: proportion(p).text()))]
    if settings["ppl_sequences"]:
        cols.append(("ppl", value("perplexity", "ppl", lambda x: f"{x:.3f}")))
    return cols


def table(doc):
    """Markdown table: a row per configuration (cells it has not measured: —)."""
    cols = columns(doc["settings"])
    headers = [header for header, _ in cols]
    rows = []
    for name, record in doc["configs"].items():
        label = name if record["status"] == "ok" else f"{name} ({record['status']})"
        cells = [cell(record) for _, cell in cols]
        if name == REFERENCE and "agreement" in record and AGREEMENT_HEADERS[0] in headers:
            at = headers.index(AGREEMENT_HEADERS[0])  # the others are compared with its continuations
            cells[at:at + len(AGREEMENT_HEADERS)] = ["reference"] * len(AGREEMENT_HEADERS)
        rows.append([label, *cells])
    return markdown_table(["config", *headers], rows)


def notes(doc):
    """The workload, command, machine and server flags, in words."""
    s, machine = doc["settings"], doc["machine"]
    gpus = ", ".join(g.get("name", "?") for g in machine.get("gpus", [])) or "no GPU found"
    packages = ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items())
    lines = [
        f"Model {s['model']}; haystack and held-out text: {', '.join(s['data'])} from token "
        f"{s['haystack_offset']} ({s['style']} prompts, seed {s['seed']}, {s['needles']} needles). "
        f"Retrieval: {s['trials']} trials per task and length, lengths {', '.join(map(str, s['lengths']))}; "
        f"cold: after a cache flush; radix: the context cached by a request of its own first "
        f"(radix cached: mean share of prompt tokens served from the cache). Multi-turn: "
        f"{s['conversations']} conversations of {s['turns']} turns of {s['turn_length']} tokens "
        f"(replies of up to {s['reply_tokens']} tokens), then the question (cached: share of that "
        f"last request served from the cache). Agreement: "
        f"{s['agreement_prompts']} held-out windows of {s['agreement_length']} tokens, "
        f"{s['agreement_tokens']} greedy tokens each, against bf16's (mean index of the first "
        f"differing token; share identical throughout). Perplexity: {s['ppl_sequences']} windows "
        f"of {s['ppl_length']} tokens, positions >= {s['ppl_from']}. Rates: % correct [Wilson 95 % "
        f"interval]. bits/elem: bits stored per K or V element (OSCAR: its 2-bit pool with scales; "
        f"the BF16 sink and recent rows of running requests aside).",
        f"Every server: --chunked-prefill-size {s['chunked_prefill_size']} --context-length "
        f"{s['context_length']} --mem-fraction-static {s['mem_fraction_static']}"
        + (f" {shlex.join(s['extra_server_args'])}" if s["extra_server_args"] else "") + "; radix cache on.",
        *(f"{name}: `{shlex.join(r['kv_flags'])}`" for name, r in doc["configs"].items() if r.get("kv_flags")),
        *(f"{name} {r['status']}: {r['error']}" for name, r in doc["configs"].items() if r.get("error")),
        f"Machine: {gpus}; {packages}.",
        f"Command: `{doc['command']}`",
    ]
    return "\n\n".join(lines)


def markdown(doc):
    """The whole markdown report."""
    return f"# Server quality: {Path(doc['settings']['model']).name}\n\n{table(doc)}\n\n{notes(doc)}\n"


def plot(doc, path):
    """Retrieval rate (with Wilson 95 % bars) against prompt length, a line per configuration:
    passkey cold and radix, the multi-needle tasks cold. False if there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["settings"]
    panels = [(task, phase) for task, phase in (("passkey", "cold"), ("passkey", "radix"),
                                                ("multi-needle-one", "cold"), ("multi-needle-all", "cold"))
              if task in s["tasks"]]
    if not panels:
        return False
    lengths = [str(n) for n in s["lengths"]]
    names = list(doc["configs"])
    columns = min(len(panels), 2)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    for ax, (task, phase) in zip(axes.flat, panels):
        for k, name in enumerate(names):
            found = doc["configs"][name].get("retrieval", {}).get(task, {}).get(phase, {}).get("scores", {})
            points = [(x, proportion(found[n])) for x, n in enumerate(lengths) if n in found]
            if not points:
                continue
            shift = (k - (len(names) - 1) / 2) * 0.08  # side by side, so the bars stay apart
            xs = [x + shift for x, _ in points]
            rates = [100 * p.rate for _, p in points]
            # clipped at 0: at a rate of 0 or 1 the interval's end can miss it by a rounding error
            low = [max(0.0, r - 100 * p.interval()[0]) for r, (_, p) in zip(rates, points)]
            high = [max(0.0, 100 * p.interval()[1] - r) for r, (_, p) in zip(rates, points)]
            ax.errorbar(xs, rates, yerr=[low, high], marker="o", capsize=3, label=name)
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("% correct")
        ax.set_ylim(-5, 105)
        ax.set_title(f"{task} ({phase})")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(f"{Path(s['model']).name}: retrieval through the server, Wilson 95 % intervals")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- command line


def variant(text):
    """argparse type: LABEL=PATH of --oscar-variant."""
    label, sep, path = text.partition("=")
    if not sep or not path or not LABEL_RE.fullmatch(label):
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH with LABEL of letters, digits, . _ -; got {text!r}")
    return label, path


def names(text):
    """argparse type: comma-separated names, order kept."""
    return [name.strip() for name in text.split(",") if name.strip()]


def tasks(text):
    """argparse type: comma-separated retrieval tasks ('' for none)."""
    found = names(text)
    unknown = [task for task in found if task not in TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    return found


count = int_at_least(0)  # argparse type of the phase sizes: 0 skips the phase


def build_parser():
    """Command-line flags."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", type=Path, required=True,
                   help="HF checkpoint folder the servers load (the tokenizer is read from it too)")
    p.add_argument("--configs", type=names, default=names(DEFAULT_CONFIGS),
                   help=f"comma-separated, bf16 first, from {', '.join(BUILTIN_CONFIGS)} and the "
                   "--oscar-variant labels (default: %(default)s)")
    p.add_argument("--rotations", help="calibrated rotation artifact of configuration oscar")
    p.add_argument("--oscar-variant", type=variant, action="append", default=[], metavar="LABEL=PATH",
                   help="add configuration oscar-LABEL served with --oscar-rotations PATH (repeatable)")
    retrieval = RetrievalSettings()  # the harness's defaults: equal prompts by default
    g = p.add_argument_group("prompts")
    g.add_argument("--data", nargs="+", default=["paul-graham-essays"],
                   help="haystack and held-out text files, or the alias paul-graham-essays (default)")
    g.add_argument("--offset-tokens", type=count, default=retrieval.haystack_offset,
                   help="the haystack and held-out windows start at this token of the data, away from "
                   "calibration text (default: %(default)s)")
    g.add_argument("--prompt-style", choices=PROMPT_STYLES, default=retrieval.style, help="(default: %(default)s)")
    g.add_argument("--seed", type=int, default=retrieval.seed, help="(default: %(default)s)")
    g.add_argument("--needles", type=positive_int, default=retrieval.needles, help="facts of the multi-needle tasks (default: %(default)s)")
    g.add_argument("--tasks", type=tasks, default=list(retrieval.tasks),
                   help=f"retrieval tasks (default: {','.join(retrieval.tasks)})")
    g.add_argument("--lengths", type=parse_int_list, default=list(retrieval.lengths),
                   help=f"retrieval prompt lengths in tokens (default: {','.join(map(str, retrieval.lengths))})")
    g.add_argument("--trials", type=positive_int, default=retrieval.trials, help="prompts per task and length (default: %(default)s)")
    g.add_argument("--conversations", type=count, default=40, help="multi-turn conversations, 0: none "
                   "(default: %(default)s)")
    g.add_argument("--turns", type=positive_int, default=4, help="user turns per conversation (default: %(default)s)")
    g.add_argument("--turn-length", type=positive_int, default=1400, help="tokens per user turn (default: %(default)s)")
    g.add_argument("--agreement-prompts", type=count, default=40, help="held-out windows, 0: none "
                   "(default: %(default)s)")
    g.add_argument("--agreement-length", type=positive_int, default=1536, help="tokens per window (default: %(default)s)")
    g.add_argument("--agreement-tokens", type=positive_int, default=64,
                   help="greedy tokens generated (default: %(default)s)")
    g.add_argument("--ppl-sequences", type=count, default=8, help="held-out windows, 0: none (default: %(default)s)")
    g.add_argument("--ppl-length", type=positive_int, default=4096, help="tokens per window (default: %(default)s)")
    g.add_argument("--ppl-from", type=positive_int, default=1024,
                   help="perplexity over positions >= this (default: %(default)s)")
    g = p.add_argument_group("servers")
    g.add_argument("--chunked-prefill-size", type=positive_int, default=512, help="(default: %(default)s)")
    g.add_argument("--context-length", type=positive_int, default=8192, help="(default: %(default)s)")
    g.add_argument("--mem-fraction-static", type=float, default=0.5, help="(default: %(default)s)")
    g.add_argument("--extra-server-args", type=flag_list, default=[],
                   help="more flags for every server, one quoted string, e.g. --extra-server-args='--tp-size 2'")
    g.add_argument("--startup-timeout", type=float, default=600.0, help="seconds (default: %(default)s)")
    g.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS_DIR, help="(default: benchmarks/results)")
    g.add_argument("--name", help="results file stem (default: quality-server-<model folder name, lower case>)")
    g.add_argument("--logs-dir", type=Path, default=DEFAULT_RESULTS_DIR / "logs",
                   help="server logs go to <logs-dir>/<name>/ (default: benchmarks/results/logs)")
    return p


def check_args(args):
    """Raise ValueError for flag values that contradict each other (argparse checks the rest)."""
    if "--disable-radix-cache" in args.extra_server_args:
        raise ValueError("--disable-radix-cache: the radix and multi-turn phases read from the radix cache")
    if args.ppl_sequences and args.ppl_from >= args.ppl_length:
        raise ValueError(f"--ppl-from {args.ppl_from} leaves no position of --ppl-length {args.ppl_length}")


def settings(args, model_path, data_files, stream_tokens):
    """Everything that decides the prompts and the servers' flags (bar the KV option)."""
    return {
        "model": str(model_path),
        "data": args.data,
        "data_files": data_files,
        "stream_tokens": stream_tokens,
        # the fields of calibration.harness.RetrievalSettings: equal values, equal prompts
        "tasks": args.tasks,
        "lengths": args.lengths,
        "trials": args.trials,
        "haystack_offset": args.offset_tokens,
        "style": args.prompt_style,
        "needles": args.needles,
        "seed": args.seed,
        "conversations": args.conversations,
        "turns": args.turns,
        "turn_length": args.turn_length,
        "reply_tokens": REPLY_TOKENS,
        "agreement_prompts": args.agreement_prompts,
        "agreement_length": args.agreement_length,
        "agreement_tokens": args.agreement_tokens,
        "ppl_sequences": args.ppl_sequences,
        "ppl_length": args.ppl_length,
        "ppl_from": args.ppl_from,
        "chunked_prefill_size": args.chunked_prefill_size,
        "context_length": args.context_length,
        "mem_fraction_static": args.mem_fraction_static,
        "extra_server_args": args.extra_server_args,
        "client_workers": WORKERS,
        "cache_share": CACHE_SHARE,
    }


def main(argv=None):
    """Build the prompts, run every configuration one after another, write the results; exit 0
    if all succeeded, 1 if any failed, 130 if interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        kv = config_flags(args.configs, args.rotations, args.oscar_variant)
        check_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    raise_keyboard_interrupt_on_sigterm()
    model_path = args.model_path.resolve()
    name = args.name or f"quality-server-{model_path.name.lower()}"
    json_path, logs_dir = args.out_dir / f"{name}.json", args.logs_dir / name

    from transformers import AutoTokenizer  # slow import, needed only here

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    try:
        data_files = resolve_data(args.data)
        stream = token_stream(tokenizer, data_files)
        workload = build_workload(args, tokenizer, stream)
    except DataError as exc:
        parser.error(str(exc))
    longest = longest_request(workload, args.agreement_tokens)
    if longest > args.context_length:
        parser.error(f"the longest request needs {longest} tokens, more than --context-length {args.context_length}")

    argv = sys.argv[1:] if argv is None else argv
    doc = {
        "benchmark": BENCHMARK,
        "command": shlex.join([sys.executable, "-m", "benchmarks.quality_server", *argv]),
        "started": now_iso(),
        "machine": machine_info(),
        "settings": settings(args, model_path, data_files, stream.numel()),
        "configs": {},
    }

    def save():
        doc["updated"] = now_iso()
        write_results(doc, json_path, markdown)

    reference = None
    for config, flags in kv.items():
        print(f"== {config}: starting server", flush=True)
        record = doc["configs"][config] = {}
        run_config(config, flags, args, model_path, workload, reference, logs_dir, record, save)
        plot(doc, json_path.with_suffix(".png"))
        print(f"== {config}: {record['status']} in {record['elapsed_s']} s {record.get('error', '')}", flush=True)
        if record["status"] == "interrupted":
            print(f"interrupted; results so far: {json_path}", flush=True)
            return 130
        if config == REFERENCE:
            reference = reference_continuations(record)
    print(markdown(doc))
    print(f"results: {json_path} (.md, .png); server logs: {logs_dir}")
    return 0 if all(r["status"] == "ok" for r in doc["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
