"""CPU tests of benchmarks/quality_server.py.

No SGLang server and no GPU: configuration flags and refusals, prompt windows and the workload
(a character-level stand-in tokenizer), the phases against a stand-in client that keeps a radix
cache of its own, the scores, agreement and perplexity arithmetic, the HTTP client against a
local stand-in server, the table and the chart, and one whole invocation whose "SGLang server"
is a small Python HTTP server speaking the same JSON.
"""

import json
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from benchmarks import quality_server as qs
from oscar_sglang.calibration.retrieval import Proportion
from oscar_sglang.kernels.rotation_file import make_rotation_set, save_rotations  # noqa: E402

EOS = 3
WORDS = ("the quick brown fox jumps over a lazy dog while seven tired wizards quietly judge "
         "boxing matches. ").split()


class CharTokenizer:
    """One token per character (its code point): exact round trips, no chat template."""

    eos_token_id = EOS
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, clean_up_tokenization_spaces=False):
        return "".join(map(chr, ids))


def _args(*extra):
    return qs.build_parser().parse_args(["--model-path", "/models/m", *extra])


def _text(words):
    rng = torch.Generator().manual_seed(1)
    picks = torch.randint(len(WORDS), (words,), generator=rng).tolist()
    return " ".join(WORDS[i] for i in picks) + ". "


SMALL = ["--prompt-style", "plain", "--offset-tokens", "100", "--lengths", "600,900", "--trials", "3",
         "--conversations", "2", "--turns", "3", "--turn-length", "500", "--agreement-prompts", "3",
         "--agreement-length", "120", "--agreement-tokens", "8", "--ppl-sequences", "2",
         "--ppl-length", "200", "--ppl-from", "50", "--needles", "3"]


@pytest.fixture
def small(tmp_path):
    """(args, workload) of a small run over a made-up text file."""
    data = tmp_path / "text.txt"
    data.write_text(_text(3000))
    args = _args(*SMALL, "--data", str(data))
    tokenizer = CharTokenizer()
    stream = torch.tensor(tokenizer(data.read_text())["input_ids"] + [EOS])
    return args, qs.build_workload(args, tokenizer, stream)


# ---------------------------------------------------------------------------- configurations


def test_defaults():
    args = _args()
    assert args.configs == ["bf16", "fp8", "oscar", "oscar-data-free"]
    assert (args.data, args.offset_tokens, args.prompt_style, args.seed, args.needles) == (
        ["paul-graham-essays"], 40000, "chat", 0, 4)
    assert args.tasks == ["passkey", "multi-needle-one", "multi-needle-all"]
    assert (args.lengths, args.trials) == ([1024, 2048, 4096, 6000], 40)
    assert (args.turns, args.turn_length, args.conversations) == (4, 1400, 40)
    assert (args.agreement_prompts, args.agreement_length, args.agreement_tokens) == (40, 1536, 64)
    assert (args.ppl_sequences, args.ppl_length, args.ppl_from) == (8, 4096, 1024)
    assert (args.chunked_prefill_size, args.context_length, args.mem_fraction_static) == (512, 8192, 0.5)
    assert (args.startup_timeout, args.port, args.extra_server_args) == (600.0, 0, [])


def test_config_flags(tmp_path, monkeypatch):
    rotations, other = tmp_path / "a.oscar.safetensors", tmp_path / "b.oscar.safetensors"
    save_rotations(str(rotations), _tiny_rotations(2))
    save_rotations(str(other), _tiny_rotations(4))
    flags = qs.config_flags(["bf16", "fp8", "oscar", "oscar-data-free"], str(rotations), [("k4", str(other))])
    assert list(flags) == ["bf16", "fp8", "oscar", "oscar-data-free", "oscar-k4"]
    assert flags["bf16"] == ["--attention-backend", "flashinfer"]
    assert sorted(flags["fp8"]) == sorted(["--attention-backend", "flashinfer", "--kv-cache-dtype", "fp8_e4m3"])
    # the server reads each file's key width itself
    assert flags["oscar"] == ["--kv-quant", "oscar", "--oscar-rotations", str(rotations)]
    assert flags["oscar-data-free"] == ["--kv-quant", "oscar", "--oscar-rotations", "data-free"]
    assert flags["oscar-k4"] == ["--kv-quant", "oscar", "--oscar-rotations", str(other)]
    # relative paths are made absolute: the server runs in the repository root
    monkeypatch.chdir(tmp_path)
    assert qs.config_flags(["bf16", "oscar"], rotations.name)["oscar"][3] == str(rotations)
    # a variant named in --configs keeps its place there
    assert list(qs.config_flags(["bf16", "oscar-k4", "fp8"], None, [("k4", str(other))])) == [
        "bf16", "oscar-k4", "fp8"]


def _tiny_rotations(key_bits):
    rot = [torch.eye(64)[None]] * 2
    return make_rotation_set(rot, rot, [0.9, 0.9], [0.9, 0.9], model_name="tiny", num_kv_heads=1,
                             calibration_tokens=1, calibration_source="test", key_bits=key_bits)


@pytest.mark.parametrize("configs, rotations, variants, message", [
    (["fp8", "bf16"], None, [], "first configuration must be bf16"),
    (["oscar-data-free"], None, [], "first configuration must be bf16"),
    ([], None, [("x", "data-free")], "first configuration must be bf16"),
    (["bf16", "oscar"], None, [], "needs --rotations"),
    (["bf16", "oscar"], "/no/such/file", [], "does not exist"),
    (["bf16", "int4"], None, [], "unknown configuration"),
    (["bf16", "fp8", "fp8"], None, [], "listed twice"),
    (["bf16"], None, [("data-free", "data-free")], "exists already"),
    (["bf16"], None, [("x", "data-free"), ("x", "data-free")], "exists already"),
    (["bf16"], None, [("x", "/no/such/file")], "does not exist"),
])
def test_config_refusals(configs, rotations, variants, message):
    with pytest.raises(ValueError, match=message):
        qs.config_flags(configs, rotations, variants)


def test_bad_flags_end_the_run_before_any_work(capsys):
    with pytest.raises(SystemExit):
        qs.main(["--model-path", "/m", "--configs", "fp8,bf16"])
    assert "first configuration must be bf16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        qs.main(["--model-path", "/m", "--configs", "bf16", "--extra-server-args=--disable-radix-cache"])
    assert "radix" in capsys.readouterr().err
    for argv in (["--oscar-variant", "noequals"], ["--oscar-variant", "a b=x"], ["--tasks", "passkey,x"],
                 ["--trials", "0"], ["--conversations", "-1"]):
        with pytest.raises(SystemExit):
            _args(*argv)
    assert _args("--oscar-variant", "k.9=/r").oscar_variant == [("k.9", "/r")]
    assert _args("--tasks", "").tasks == [] and _args("--conversations", "0").conversations == 0


def test_server_command():
    args = _args("--extra-server-args", "--tp-size 2", "--chunked-prefill-size", "256")
    kv = ["--kv-quant", "oscar", "--oscar-rotations", "data-free"]
    cmd = qs.server_command(args, Path("/models/m"), 30001, kv)
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    value = {flag: cmd[cmd.index(flag) + 1] for flag in (
        "--model-path", "--port", "--context-length", "--chunked-prefill-size", "--mem-fraction-static",
        "--cuda-graph-max-bs-decode", "--cuda-graph-backend-prefill", "--tp-size")}
    assert value == {"--model-path": "/models/m", "--port": "30001", "--context-length": "8192",
                     "--chunked-prefill-size": "256", "--mem-fraction-static": "0.5",
                     "--cuda-graph-max-bs-decode": "32", "--cuda-graph-backend-prefill": "disabled",
                     "--tp-size": "2"}
    assert "--skip-server-warmup" in cmd and "--disable-radix-cache" not in cmd
    assert cmd[-4:] == kv


def test_server_flags_exist_in_sglang():
    """Every flag the command passes (bar the plugin's) is one SGLang 0.5.17 parses."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    known = {option for action in parser._actions for option in action.option_strings}
    cmd = qs.server_command(_args(), Path("/m"), 1, qs.kv_flags("fp8-flashinfer"))
    assert {arg for arg in cmd[3:] if arg.startswith("--")} <= known


def test_bits_per_element(tmp_path):
    assert qs.bits_per_element("bf16", "", 128) == 16.0 and qs.bits_per_element("fp8", "", None) == 8.0
    line = "[2026] OSCAR-2 KV cache: 3.00 bits/element (group 32), 100 bytes/token, 5 tokens; BF16 ..."
    assert qs.bits_per_element("oscar", line, 128) == 3.0
    assert qs.bits_per_element("oscar-x", "no such line", 128) == 2.25  # the default group: 2 + 32/128
    assert qs.bits_per_element("oscar", "", None) is None
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4096, "num_attention_heads": 32}))
    assert qs.model_head_dim(tmp_path) == 128
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"head_dim": 64}}))
    assert qs.model_head_dim(tmp_path) == 64
    assert qs.model_head_dim(tmp_path / "missing") is None


# ---------------------------------------------------------------------------- workload


def test_held_out_windows_spread_without_overlap():
    stream = torch.arange(1000)
    windows = qs.held_out_windows(stream, 100, 200, 4)
    assert [w.start for w in windows] == [100, 333, 567, 800]
    assert windows[-1].ids == list(range(800, 1000)) and all(len(w.ids) == 200 for w in windows)
    assert [w.start for w in qs.held_out_windows(stream, 100, 200, 1)] == [100]
    assert qs.held_out_windows(stream, 100, 200, 0) == []
    with pytest.raises(qs.DataError, match="pass more --data"):
        qs.held_out_windows(stream, 100, 200, 5)


def test_workload_is_the_same_every_time(small, tmp_path):
    args, workload = small
    assert list(workload.retrieval) == ["passkey", "multi-needle-one", "multi-needle-all"]
    passkey = workload.retrieval["passkey"]
    assert [p.length for p in passkey] == [600, 600, 600, 900, 900, 900]
    assert all(abs(len(p.prompt) + len(p.answer) - p.length) <= 2 for p in passkey)
    assert len(workload.conversations) == 2 and all(len(c.turns) == 3 for c in workload.conversations)
    assert [len(w.ids) for w in workload.agreement] == [120] * 3 and workload.agreement[0].start == 100
    assert [len(w.ids) for w in workload.perplexity] == [200] * 2
    tokenizer = CharTokenizer()
    stream = torch.tensor(tokenizer(Path(args.data[0]).read_text())["input_ids"] + [EOS])
    assert qs.build_workload(args, tokenizer, stream) == workload
    # the conversations do not depend on the tasks run
    fewer = _args(*SMALL, "--data", args.data[0], "--tasks", "passkey")
    assert qs.build_workload(fewer, tokenizer, stream).conversations == workload.conversations
    assert qs.longest_request(workload, args.agreement_tokens) == max(
        max(len(p.prompt) + len(p.answer) for p in passkey), *map(qs.conversation_tokens, workload.conversations))
    with pytest.raises(qs.DataError, match="past the end"):
        qs.build_workload(_args(*SMALL, "--offset-tokens", str(stream.numel())), tokenizer, stream)


# ---------------------------------------------------------------------------- phases


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class FakeClient:
    """Plays the server: a radix cache of the sequences it ran (prompt plus all but the last
    generated token, as SGLang's), and a model that answers retrieval prompts correctly from
    `answers` (prompt ids -> answer ids), replies REPLY to any other short request, and
    continues any other prompt with its own last ids reversed."""

    REPLY = [70, 71, EOS]

    def __init__(self, answers=(), wrong=()):
        self.answers = dict(answers)
        self.wrong = set(wrong)
        self.cache, self.requests, self.flushes = [], [], 0
        self.lock = threading.Lock()

    def flush(self):
        with self.lock:
            self.cache.clear()
            self.flushes += 1

    def generate(self, body):
        ids, params = body["input_ids"], body["sampling_params"]
        n = params["max_new_tokens"]
        with self.lock:
            self.requests.append(body)
            cached = max((_common_prefix(ids, c) for c in self.cache), default=0)
        key = tuple(ids)
        finish = {"type": "length", "length": n}
        if key in self.answers:
            out = list(self.answers[key])
            if key in self.wrong:
                out[0] += 1
        elif n == qs.REPLY_TOKENS:
            out, finish = list(self.REPLY), {"type": "stop", "matched": EOS}
        else:
            out = ids[::-1][:n]
        meta = {"cached_tokens": min(cached, len(ids) - 1), "finish_reason": finish}
        if body.get("return_logprob"):
            meta["input_token_logprobs"] = [[None, ids[0], None]] + [[-0.5, t, None] for t in ids[1:]]
        with self.lock:
            self.cache.append(ids + out[:-1])
        return {"output_ids": out, "meta_info": meta}


def test_cold_and_radix_phases(small):
    _, workload = small
    prompts = workload.retrieval["passkey"]
    answers = {tuple(p.prompt): p.answer for p in prompts}
    client = FakeClient(answers, wrong={tuple(prompts[0].prompt)})
    cold = qs.cold_phase(client, prompts)
    assert cold["scores"]["600"] == Proportion(2, 3).as_dict() and cold["scores"]["900"] == Proportion(3, 3).as_dict()
    assert [o["correct"] for o in cold["outcomes"]] == [False, True, True, True, True, True]
    assert cold["outcomes"][1]["generated"] == prompts[1].answer
    # the instructions only: trial t of every length starts its haystack at the same token, so
    # each length runs after a flush of its own
    assert cold["cached_fraction"]["600"] < 0.2 and cold["cached_fraction"]["900"] < 0.2
    assert client.flushes == 2
    radix = qs.radix_phase(client, prompts, capacity=2000)
    assert radix["groups"] == 3  # 3 x 600 tokens, then 900 + 900, then 900
    assert all(o["cached_tokens"] >= len(p.context) for o, p in zip(radix["outcomes"], prompts))
    assert radix["cached_fraction"]["900"] > 0.9
    assert [o["length"] for o in radix["outcomes"]] == [p.length for p in prompts]
    # every full prompt came after its context, and every group after a flush
    assert client.flushes == 2 + 3
    sent = [tuple(r["input_ids"]) for r in client.requests]
    for p in prompts:
        assert sent.index(tuple(p.context)) < sent.index(tuple(p.prompt), len(prompts))


def test_radix_groups():
    assert qs.radix_groups([3, 3, 3, 5, 5, 5], 10) == [[0, 1, 2], [3, 4], [5]]
    assert qs.radix_groups([20, 1], 10) == [[0], [1]]
    assert qs.radix_groups([], 10) == []


def test_multi_turn_sends_each_turn_after_the_reply(small):
    _, workload = small
    conversation = workload.conversations[0]
    client = FakeClient()
    outcome = qs.run_conversation(client, conversation)
    bodies = [r["input_ids"] for r in client.requests]
    reply = FakeClient.REPLY[:-1]  # the stop token is left out; the next turn's frame closes the reply
    assert bodies[0] == conversation.turns[0]
    assert bodies[1] == conversation.turns[0] + reply + conversation.turns[1]
    assert bodies[2] == bodies[1] + reply + conversation.turns[2]
    assert bodies[3] == bodies[2] + reply + conversation.question
    assert [r["sampling_params"]["max_new_tokens"] for r in client.requests] == [16, 16, 16, len(conversation.answer)]
    assert outcome["replies"] == [reply] * 3 and outcome["prompt_tokens"] == len(bodies[3])
    assert outcome["cached_tokens"] == len(bodies[2]) + len(reply)
    assert not outcome["correct"]
    answers = {tuple(bodies[3]): conversation.answer}
    result = qs.multi_turn_phase(FakeClient(answers), workload.conversations, capacity=10**6)
    assert result["score"] == Proportion(1, 2).as_dict() and result["workers"] == 2
    assert result["cached_fraction"] > 0.9
    assert qs.multi_turn_phase(FakeClient(), workload.conversations, capacity=10)["workers"] == 1


def test_reply_ids():
    def response(ids, reason):
        return {"output_ids": ids, "meta_info": {"finish_reason": reason}}

    assert qs.reply_ids(response([5, 6, EOS], {"type": "stop", "matched": EOS})) == [5, 6]
    assert qs.reply_ids(response([5, 6], {"type": "length", "length": 2})) == [5, 6]
    assert qs.reply_ids(response([5, 6], {"type": "stop", "matched": "\n"})) == [5, 6]  # a stop string


def test_first_divergence_and_agreement():
    assert qs.first_divergence([1, 2, 3, 4], [1, 2, 3, 4]) == 4
    assert qs.first_divergence([1, 2, 9, 4], [1, 2, 3, 4]) == 2
    assert qs.first_divergence([9], [1]) == 0
    assert qs.first_divergence([1, 2], [1, 2, 3]) == 2
    summary = qs.agreement_summary([[1, 2, 3], [1, 9, 3], [7, 2, 3], [1, 2, 3]], [[1, 2, 3]] * 4)
    assert summary["first_divergence"] == [3, 1, 0, 3] and summary["first_divergence_mean"] == 1.75
    assert summary["identical"] == Proportion(2, 4).as_dict()
    with pytest.raises(ValueError):
        qs.agreement_summary([[1]], [[1], [2]])


def test_agreement_phase(small):
    _, workload = small
    client = FakeClient()
    reference = qs.agreement_phase(client, workload.agreement, 8, None)
    assert "first_divergence_mean" not in reference
    assert all(r["sampling_params"] == {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
               for r in client.requests)
    continuations = qs.reference_continuations({"agreement": reference})
    assert continuations == [w.ids[::-1][:8] for w in workload.agreement]
    changed = [c[:] for c in continuations]
    changed[1][5] += 1
    ours = qs.agreement_phase(FakeClient(), workload.agreement, 8, changed)
    assert ours["first_divergence"] == [8, 5, 8] and ours["identical"] == Proportion(2, 3).as_dict()
    assert [o["start"] for o in ours["outcomes"]] == [w.start for w in workload.agreement]
    assert qs.reference_continuations({"status": "failed"}) is None


def test_perplexity_from_input_logprobs():
    ids = [10, 11, 12, 13, 14]
    entries = [[None, 10, None], [-1.0, 11, None], [-2.0, 12, None], [-3.0, 13, None], [-4.0, 14, "x"]]
    assert qs.sequence_nll(entries, ids, 3) == (7.0, 2)
    assert qs.sequence_nll(entries, ids, 0) == (10.0, 4)  # position 0 has no logprob
    assert qs.perplexity([(7.0, 2), (3.0, 2)]) == pytest.approx(math.exp(2.5))
    with pytest.raises(RuntimeError, match="is for token"):
        qs.sequence_nll(entries, [10, 11, 99, 13, 14], 1)
    with pytest.raises(RuntimeError, match="input logprobs"):
        qs.sequence_nll(entries[:-1], ids, 1)


def test_perplexity_phase(small):
    _, workload = small
    client = FakeClient()
    result = qs.perplexity_phase(client, workload.perplexity, 50)
    assert result["ppl"] == pytest.approx(math.exp(0.5)) and result["tokens"] == 2 * 150
    assert all(r["return_logprob"] and r["logprob_start_len"] == 0 and r["sampling_params"]["max_new_tokens"] == 1
               for r in client.requests)


def test_generate_body():
    assert qs.generate_body([1, 2], 5) == {
        "input_ids": [1, 2], "sampling_params": {"temperature": 0.0, "max_new_tokens": 5, "ignore_eos": False}}
    body = qs.generate_body((1, 2), 1, logprobs=True)
    assert body["return_logprob"] is True and body["logprob_start_len"] == 0 and body["input_ids"] == [1, 2]


# ---------------------------------------------------------------------------- report


def _measured_doc(small, fail_second=False):
    """A results doc of bf16 and oscar measured against FakeClient (oscar misses two prompts and
    one continuation), and a failed fp8."""
    args, workload = small
    answers = {tuple(p.prompt): p.answer for prompts in workload.retrieval.values() for p in prompts}
    doc = {"command": "python -m benchmarks.quality_server --model-path /models/m", "machine": {
        "gpus": [{"name": "NVIDIA H100 80GB HBM3"}], "packages": {"sglang": "0.5.17"}},
        "settings": qs.settings(args, Path("/models/Qwen3-8B"), args.data, 9000), "configs": {}}
    reference = None
    for name in ("bf16", "oscar"):
        wrong = {tuple(workload.retrieval["passkey"][i].prompt) for i in (0, 4)} if name == "oscar" else ()
        record = {"status": "running", "kv_pool_tokens": 4000, "bits_per_element": 16.0 if name == "bf16" else 2.25,
                  "kv_flags": qs.kv_flags("bf16-flashinfer") if name == "bf16" else qs.oscar_flags("data-free")}
        qs.measure(FakeClient(answers, wrong), workload, args, reference, record, lambda: None)
        record["status"] = "ok"
        doc["configs"][name] = record
        reference = qs.reference_continuations(record)
    doc["configs"]["fp8"] = {"status": "failed", "error": "RuntimeError: process exited with code 1",
                             "kv_flags": qs.kv_flags("fp8-flashinfer")}
    return doc


def test_measure_and_table(small, capsys):
    doc = _measured_doc(small)
    oscar = doc["configs"]["oscar"]
    assert set(oscar["retrieval"]) == {"passkey", "multi-needle-one", "multi-needle-all"}
    assert oscar["retrieval"]["passkey"]["cold"]["scores"]["600"] == Proportion(2, 3).as_dict()
    assert oscar["agreement"]["identical"] == Proportion(3, 3).as_dict()
    assert all("seconds" in oscar[key] for key in ("multi_turn", "agreement", "perplexity"))
    assert "passkey cold" in capsys.readouterr().out
    table = qs.table(doc)
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["config", "bits/elem", "passkey cold 600", "passkey cold 900", "passkey radix 600",
                      "passkey radix 900", "radix cached", "multi-needle-one 600", "multi-needle-one 900",
                      "multi-needle-all 600", "multi-needle-all 900", "multi-turn", "multi-turn cached",
                      "first diff. token", "identical to bf16", "ppl"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    bf16, oscar_row, fp8 = rows["bf16"], rows["oscar"], rows["fp8 (failed)"]
    assert bf16[1] == "16" and oscar_row[1] == "2.25"
    assert bf16[2] == Proportion(3, 3).text() == "100 % [44, 100]"
    assert oscar_row[2] == Proportion(2, 3).text() and oscar_row[3] == Proportion(2, 3).text()
    assert bf16[13:15] == ["reference", "reference"] and oscar_row[13:15] == ["8.0", Proportion(3, 3).text()]
    assert oscar_row[15] == f"{math.exp(0.5):.3f}"
    assert fp8[1:] == ["—"] * 15
    report = qs.markdown(doc)
    assert report.startswith("# Server quality: Qwen3-8B")
    assert "fp8 failed: RuntimeError: process exited with code 1" in report
    assert "oscar: `--kv-quant oscar --oscar-rotations data-free`" in report
    assert "NVIDIA H100 80GB HBM3" in report and doc["command"] in report


def test_table_leaves_out_phases_not_run(small):
    doc = _measured_doc(small)
    doc["settings"].update(tasks=["passkey"], conversations=0, agreement_prompts=0, ppl_sequences=0)
    header = qs.table(doc).splitlines()[0]
    assert "multi-needle" not in header and "multi-turn" not in header and "ppl" not in header
    assert "passkey radix 900" in header


def test_png_is_written(small, tmp_path):
    doc = _measured_doc(small)
    assert qs.plot(doc, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc["settings"]["tasks"] = []
    assert not qs.plot(doc, tmp_path / "none.png")


# ---------------------------------------------------------------------------- HTTP and a whole run

# A stand-in for `python -m sglang.launch_server`: the endpoints and JSON fields the benchmark
# reads (continuations: the prompt's last ids reversed), and the start-up log line of the pool.
FAKE_SERVER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

port = int(sys.argv[sys.argv.index("--port") + 1])
print("max_total_num_tokens=50000, chunked_prefill_size=512", flush=True)
if "oscar" in sys.argv:
    print("OSCAR-2 KV cache: 2.25 bits/element (group 128), 1 bytes/token", flush=True)
if "fail" in sys.argv:
    sys.exit(1)

class Handler(BaseHTTPRequestHandler):
    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = urlparse(self.path).path
        if path == "/health_generate":
            self.reply(200, {})
        elif path == "/server_info":
            self.reply(200, {"max_total_num_tokens": 50000})
        else:
            self.reply(404, {"error": path})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        path = urlparse(self.path).path
        if path == "/flush_cache":
            self.reply(200, {})
            return
        ids = body["input_ids"]
        n = body["sampling_params"]["max_new_tokens"]
        meta = {"cached_tokens": 0, "finish_reason": {"type": "length", "length": n}}
        if body.get("return_logprob"):
            meta["input_token_logprobs"] = [[None, ids[0], None]] + [[-1.0, t, None] for t in ids[1:]]
        self.reply(200, {"output_ids": ids[::-1][:n], "meta_info": meta})

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def test_client_speaks_sglang_json():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, json.loads(body)))
            code, answer = (400, b"Cache not flushed") if "fail" in json.loads(body) else (
                200, json.dumps({"output_ids": [1], "meta_info": {"cached_tokens": 0}}).encode())
            self.send_response(code)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def do_GET(self):
            answer = json.dumps({"max_total_num_tokens": 1234}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = qs.Client(server.server_address[1], timeout=10)
        assert client.generate(qs.generate_body([5], 1))["output_ids"] == [1]
        client.flush()
        assert seen[-1][0] == f"/flush_cache?timeout={qs.FLUSH_WAIT_S}"
        assert qs.pool_tokens(client, "") == 1234
        with pytest.raises(RuntimeError, match="HTTP 400: Cache not flushed"):
            client.generate({"fail": 1})
    finally:
        server.shutdown()


def test_whole_run_against_a_stand_in_server(small, tmp_path, monkeypatch, capsys):
    import transformers

    args, _ = small
    fake = tmp_path / "fake_server.py"
    fake.write_text(FAKE_SERVER)
    real_command = qs.server_command

    def command(args, model_path, port, kv):
        cmd = real_command(args, model_path, port, kv)
        extra = ["oscar"] if "oscar" in kv else []
        extra += ["fail"] if "fp8_e4m3" in kv else []
        return [sys.executable, str(fake), *cmd[3:], *extra]

    monkeypatch.setattr(qs, "server_command", command)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: CharTokenizer())
    model = tmp_path / "Tiny-Model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"head_dim": 128}))
    argv = ["--model-path", str(model), *SMALL, "--data", args.data[0], "--configs", "bf16,fp8,oscar-data-free",
            "--out-dir", str(tmp_path / "out"), "--logs-dir", str(tmp_path / "logs"), "--startup-timeout", "60"]
    assert qs.main(argv) == 1  # fp8's server exits at start-up
    doc = json.loads((tmp_path / "out" / "quality-server-tiny-model.json").read_text())
    assert [(n, r["status"]) for n, r in doc["configs"].items()] == [
        ("bf16", "ok"), ("fp8", "failed"), ("oscar-data-free", "ok")]
    fp8 = doc["configs"]["fp8"]
    assert "exited with code 1" in fp8["error"] and "max_total_num_tokens" in fp8["server_log_tail"]
    oscar = doc["configs"]["oscar-data-free"]
    assert oscar["bits_per_element"] == 2.25 and oscar["kv_pool_tokens"] == 50000
    assert oscar["agreement"]["identical"] == Proportion(3, 3).as_dict()  # both reverse the prompt
    assert oscar["perplexity"]["ppl"] == pytest.approx(math.e)
    assert oscar["server_command"].endswith("--kv-quant oscar --oscar-rotations data-free oscar")
    assert doc["settings"]["haystack_offset"] == 100 and doc["settings"]["lengths"] == [600, 900]
    assert doc["command"].endswith("--startup-timeout 60")
    assert (tmp_path / "out" / "quality-server-tiny-model.md").read_text().startswith("# Server quality: Tiny-Model")
    assert (tmp_path / "out" / "quality-server-tiny-model.png").is_file()
    assert (tmp_path / "logs" / "quality-server-tiny-model" / "bf16.server.log").is_file()
    assert "results:" in capsys.readouterr().out
