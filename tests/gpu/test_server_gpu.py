"""A real SGLang server with --kv-quant oscar on a dummy-weight Qwen3-8B (GPU only).

Covers: startup and the capacity log line, /generate, /v1/chat/completions, radix prefix
sharing on compressed slots, and the debug switch that routes attention through the PyTorch
reference (same greedy tokens and close logprobs as the kernels, for one request and for four
decoding together), with 4- and 3-bit keys.
"""

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import server_helpers
from oscar_sglang.config import DATA_FREE_ROTATIONS
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS, OscarFormat
from server_helpers import post, processes

pytestmark = pytest.mark.gpu

# Data-free rotations: dummy weights, so no calibrated file exists and quality is not measured.
SERVER_FLAGS = ["--load-format", "dummy", "--kv-quant", "oscar", "--oscar-rotations",
                DATA_FREE_ROTATIONS, "--context-length", "16384",
                "--mem-fraction-static", "0.40", "--cuda-graph-backend-prefill", "disabled",
                "--cuda-graph-bs-decode", "1", "4", "--max-running-requests", "8", "--decode-log-interval", "1"]


def running_server(name, extra_flags=(), env=()):
    """Two of these fit on one 80 GB GPU at once (--mem-fraction-static 0.40 each)."""
    return server_helpers.running_server(name, [*SERVER_FLAGS, *extra_flags], env)


@pytest.fixture(scope="module")
def server():
    with running_server("oscar-server") as running:
        yield running.port, running.log


def generate(port, text, max_new_tokens=16, logprobs=False):
    return post(port, "/generate", {
        "text": text, "return_logprob": logprobs,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}})


def test_capacity_is_logged(server):
    _, log = server
    text = log.read_text()
    line = re.search(r"OSCAR-2 KV cache: .*\(([\d.]+)x\)", text)
    assert line, processes.log_tail(log, 80)
    print(line.group(0))
    # BF16 over the codes' bits (4.9x at the default 4-bit keys), less the window share
    assert float(line.group(1)) >= 0.75 * 16 / OscarFormat(128, key_bits=DEFAULT_KEY_BITS).bits_per_element


def test_generate_and_chat(server):
    port, _ = server
    out = generate(port, "The capital of France is")
    assert out["meta_info"]["completion_tokens"] == 16
    chat = post(port, "/v1/chat/completions", {
        "model": "default", "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello."}]})
    assert chat["choices"][0]["message"]["content"] is not None
    assert chat["usage"]["completion_tokens"] > 0


def test_shared_prefix_hits_the_radix_cache(server):
    port, _ = server
    system = " ".join(f"rule {i}: agents answer politely and cite sources." for i in range(300))
    first = generate(port, system + " Question one?", max_new_tokens=4)
    second = generate(port, system + " Question two?", max_new_tokens=4)
    prompt = second["meta_info"]["prompt_tokens"]
    cached = second["meta_info"]["cached_tokens"]
    print("prompt", prompt, "cached", cached, "first cached", first["meta_info"]["cached_tokens"])
    assert cached >= prompt - 16


REFERENCE_PROMPT = "Long-context serving keeps the KV cache small. " * 60
# four requests that share no prefix: decoding together they are 32 (request, KV head) pairs, whose
# split programs run in int2_split.cu (kernels/decode.py, DecodeLaunch.cuda_min_pairs), against the
# Triton split kernel for one alone
TOGETHER_PROMPTS = [f"Agent {i} asks. {REFERENCE_PROMPT}" for i in range(4)]


def assert_matches_reference(fast, slow):
    """Greedy tokens of the kernels' and the reference's /generate answers agree over the first
    8, with log-probabilities within 0.1."""
    fast_lp = [t[0] for t in fast["meta_info"]["output_token_logprobs"]]
    slow_lp = [t[0] for t in slow["meta_info"]["output_token_logprobs"]]
    fast_ids = [t[1] for t in fast["meta_info"]["output_token_logprobs"]]
    slow_ids = [t[1] for t in slow["meta_info"]["output_token_logprobs"]]
    agree = sum(a == b for a, b in zip(fast_ids, slow_ids))
    print("greedy agreement", agree, "/", len(fast_ids), "max |dlogprob|",
          max(abs(a - b) for a, b in zip(fast_lp, slow_lp)))
    assert fast_ids[:8] == slow_ids[:8]
    assert max(abs(a - b) for a, b in zip(fast_lp[:8], slow_lp[:8])) < 0.1


def reference_answers(prompts, extra_flags=()):
    with running_server("oscar-reference", ["--disable-cuda-graph", *extra_flags],
                        ["SGLANG_OSCAR_REFERENCE_ATTENTION=1"]) as reference:
        return [generate(reference.port, prompt, max_new_tokens=24, logprobs=True) for prompt in prompts]


def test_reference_switch_matches_kernels(server):
    port, log = server
    alone = generate(port, REFERENCE_PROMPT, max_new_tokens=24, logprobs=True)
    with ThreadPoolExecutor(len(TOGETHER_PROMPTS)) as pool:
        together = list(pool.map(lambda prompt: generate(port, prompt, max_new_tokens=24, logprobs=True),
                                 TOGETHER_PROMPTS))
    assert re.search(rf"Decode batch.*#running-req: {len(TOGETHER_PROMPTS)},", log.read_text()), \
        processes.log_tail(log, 40)
    references = reference_answers([REFERENCE_PROMPT, *TOGETHER_PROMPTS])
    for fast, slow in zip([alone, *together], references):
        assert_matches_reference(fast, slow)


def test_three_bit_keys_match_the_reference(server):
    """3-bit keys end to end: the pool, the write, the decode and extend kernels (one server at a
    time beside the module's)."""
    flags = ["--oscar-key-bits", "3"]
    with running_server("oscar-k3", flags) as fast_server:
        assert "3-bit keys" in fast_server.log_text()
        fast = generate(fast_server.port, REFERENCE_PROMPT, max_new_tokens=24, logprobs=True)
    assert_matches_reference(fast, reference_answers([REFERENCE_PROMPT], flags)[0])
