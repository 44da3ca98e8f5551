"""Plain helpers of the tensor- and data-parallel tests (tests/gpu/test_parallel_gpu.py, which
says what they check; tests/test_parallel_cpu.py covers the helpers without a GPU): random Qwen3
checkpoints and per-head rotation files, prompt sets, TP=2-vs-TP=1 agreement, the capacity lines
of a server log."""

import json
import math
import random
import re
from pathlib import Path

import torch
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS, OscarFormat
from oscar_sglang.kernels.rotation_file import make_rotation_set

SEED = 2026
INIT_STD = 0.02
# Ordinary vocabulary ids of the Qwen tokenizer (special tokens start at 151643).
TOKEN_LO, TOKEN_HI = 1000, 150000


# "[2026-11-23 15:17:28 DP1 TP0] OSCAR-2 KV cache: 2.25 bits/element (2-bit keys, 2-bit values,
# group 128), 10368 bytes/token, ..." (oscar_sglang.sizing; SGLang's scheduler log prefix names the ranks)
CAPACITY_RE = re.compile(
    r"^\[(?P<prefix>[^\]]*)\] OSCAR-2 KV cache: [\d.]+ bits/element \([^)]*\), "
    r"(?P<bytes>\d+) bytes/token, (?P<tokens>\d+) tokens; BF16 KV would hold (?P<bf16>\d+) tokens "
    r"in the same budget \((?P<ratio>[\d.]+)x\); window rows for (?P<requests>\d+) running requests",
    re.MULTILINE)
WINDOW_RE = re.compile(r"^\[(?P<prefix>[^\]]*)\] OSCAR window rows: (?P<requests>\d+) requests", re.MULTILINE)


# ---------------------------------------------------------------------------- model


def checkpoint_spec(config):
    """(name, shape, init) of every tensor of a Qwen3 checkpoint with this HF config; init is
    "normal" (N(0, INIT_STD)) or "ones" (norm weights)."""
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    spec = [("model.embed_tokens.weight", (vocab, hidden), "normal")]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        spec += [
            (p + "input_layernorm.weight", (hidden,), "ones"),
            (p + "self_attn.q_proj.weight", (q_out, hidden), "normal"),
            (p + "self_attn.k_proj.weight", (kv_out, hidden), "normal"),
            (p + "self_attn.v_proj.weight", (kv_out, hidden), "normal"),
            (p + "self_attn.o_proj.weight", (hidden, q_out), "normal"),
            (p + "self_attn.q_norm.weight", (head_dim,), "ones"),
            (p + "self_attn.k_norm.weight", (head_dim,), "ones"),
            (p + "post_attention_layernorm.weight", (hidden,), "ones"),
            (p + "mlp.gate_proj.weight", (inter, hidden), "normal"),
            (p + "mlp.up_proj.weight", (inter, hidden), "normal"),
            (p + "mlp.down_proj.weight", (hidden, inter), "normal"),
        ]
    spec.append(("model.norm.weight", (hidden,), "ones"))
    if not config.get("tie_word_embeddings", False):
        spec.append(("lm_head.weight", (vocab, hidden), "normal"))
    return spec


def write_random_checkpoint(folder, config, seed=SEED, device="cpu"):
    """model.safetensors + config.json of a Qwen3 model with random weights, seeded per tensor
    (the values depend on `device`, whose generator draws them)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for index, (name, shape, init) in enumerate(checkpoint_spec(config)):
        if init == "ones":
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        generator = torch.Generator(device=device).manual_seed(seed * 100_003 + index)
        values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        tensors[name] = (values * INIT_STD).to(torch.bfloat16).cpu()
        del values
    partial = folder / "model.safetensors.partial"
    save_file(tensors, str(partial), metadata={"format": "pt"})
    partial.rename(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def int2_bytes_per_token(config, kv_heads, key_bits=DEFAULT_KEY_BITS):
    """OSCAR's INT2 bytes per token (all layers, K and V) for `kv_heads` KV heads per rank."""
    fmt = OscarFormat(config["head_dim"], key_bits=key_bits)
    return fmt.bytes_per_token(config["num_hidden_layers"], kv_heads)


def random_model_config(base_config, layers):
    return dict(base_config, num_hidden_layers=layers, torch_dtype="bfloat16")


def per_head_rotations(num_layers, num_kv_heads, head_dim, seed=SEED, model_name="random"):
    """A RotationSet with its own random orthogonal K and V rotation per layer and KV head."""
    generator = torch.Generator().manual_seed(seed)

    def orthogonal():
        q, r = torch.linalg.qr(torch.randn(num_kv_heads, head_dim, head_dim, generator=generator,
                                           dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]).float()

    k_rot = [orthogonal() for _ in range(num_layers)]
    v_rot = [orthogonal() for _ in range(num_layers)]
    return make_rotation_set(k_rot, v_rot, [0.96] * num_layers, [0.92] * num_layers,
                             model_name=model_name, num_kv_heads=num_kv_heads,
                             calibration_tokens=0, calibration_source="random per-head test")


def prompt_set(n, seed=SEED, lo=64, hi=1536):
    """n token-id prompts, lengths log-uniform in lo..hi, each with its own first token (no
    radix hits between them)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        length = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        ids = [rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(length)]
        ids[0] = TOKEN_LO + i
        prompts.append(ids)
    return prompts


# ---------------------------------------------------------------------------- comparisons


def first_divergence(a, b):
    """First index where the sequences differ (len of the shorter if one is a prefix), None
    when equal."""
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return min(len(a), len(b)) if len(a) != len(b) else None


def agreement(reference, other):
    """How `other` (TP=2) agrees with `reference` (TP=1): identical generations, mean fraction
    of new tokens before the first divergence, and the divergences (prompt index, position,
    reference's top-2 logprob gap there)."""
    identical, fractions, divergences = 0, [], []
    for index, (ref, got) in enumerate(zip(reference, other)):
        k = first_divergence(ref["ids"], got["ids"])
        length = max(len(ref["ids"]), 1)
        if k is None:
            identical += 1
            fractions.append(1.0)
            continue
        fractions.append(k / length)
        gap = ref["gaps"][k] if k < len(ref["gaps"]) else None
        divergences.append({"index": index, "position": k,
                            "top2_gap": None if gap is None else round(gap, 4)})
    n = len(fractions)
    return {"n": n, "identical": identical,
            "mean_agreed_fraction": sum(fractions) / n if n else 0.0,
            "divergences": divergences}


def within_margin(oscar, bf16, margin):
    """Problems (empty: none) of OSCAR's TP=2-vs-TP=1 agreement against BF16's."""
    problems = []
    allowed = math.ceil(margin * bf16["n"])
    if oscar["identical"] < bf16["identical"] - allowed:
        problems.append(f"OSCAR keeps {oscar['identical']}/{oscar['n']} generations identical, "
                        f"BF16 {bf16['identical']}/{bf16['n']} (allowed: {allowed} fewer)")
    if oscar["mean_agreed_fraction"] < bf16["mean_agreed_fraction"] - margin:
        problems.append(f"OSCAR's mean agreed fraction {oscar['mean_agreed_fraction']:.3f} is more "
                        f"than {margin} below BF16's {bf16['mean_agreed_fraction']:.3f}")
    return problems


def capacity_lines(text):
    """The OSCAR capacity lines of a server log: ranks (from SGLang's log prefix: "TP1",
    "DP0 TP0"; None where it names none), bytes per token, tokens, BF16 tokens, ratio, requests."""
    lines = []
    for m in CAPACITY_RE.finditer(text):
        prefix = m.group("prefix")
        tp = re.search(r"\bTP(\d+)\b", prefix)
        dp = re.search(r"\bDP(\d+)\b", prefix)
        lines.append({"tp": int(tp.group(1)) if tp else None, "dp": int(dp.group(1)) if dp else None,
                      "bytes_per_token": int(m.group("bytes")), "tokens": int(m.group("tokens")),
                      "bf16_tokens": int(m.group("bf16")), "ratio": float(m.group("ratio")),
                      "requests": int(m.group("requests"))})
    return lines


def window_lines(text):
    return [m.group("prefix") for m in WINDOW_RE.finditer(text)]


def speedup(dp1, dp2):
    """DP=2 / DP=1 output throughput from the two benchmark records (None if either lacks it)."""
    a = (dp1.get("metrics") or {}).get("output_tok_s")
    b = (dp2.get("metrics") or {}).get("output_tok_s")
    return None if not a or b is None else b / a


if __name__ == "__main__":  # `parallel_cases.py write-checkpoint FOLDER`: the checkpoint of FOLDER/spec.json
    import sys

    assert sys.argv[1:2] == ["write-checkpoint"], sys.argv
    target = Path(sys.argv[2])
    write_random_checkpoint(target, json.loads((target / "spec.json").read_text()),
                            device="cuda" if torch.cuda.is_available() else "cpu")
