"""Centered keys: does removing each rotated key direction's mean before per-token codes keep what
the served 2-bit keys lose? A harness simulation of formats the server does not have.

Softmax ignores a vector added to every key (q · (k + c) shifts all of one query's logits
equally), yet a per-token scale and minimum spend their four levels on the offsets that keys
carry per direction. Here each rotated key row has a mean subtracted before the served per-token
2-bit codes (group = head_dim, clipped at `clip`) and added back after:

- "block": the mean of each direction over each block of `block` consecutive positions after the
  sinks (fp16, like KIVI's per-channel minimum; a block is quantized once all its positions are
  known, which the recent window guarantees when block <= recent);
- "calibrated": one mean per layer and KV head, from the keys of --mean-tokens calibration tokens
  at the start of --data (positions >= the sinks), so nothing is stored per block.

Values are the served 2-bit values; sinks and recent positions stay exact. The served format
runs beside them as the control. Writes key-means-NAME.{json,md}.

    python -m benchmarks.key_means --model smollm2-135m-instruct --data paul-graham-essays \\
        --rotations benchmarks/results/smollm2-135m-instruct.oscar.safetensors \\
        --variants block64,block64:1.0,calibrated,calibrated:1.0
"""

import argparse

import torch

from benchmarks.harness_args import score_beside_served, simulation_parser
from oscar_sglang.calibration.attention import check_unpadded, windowed_attention
from oscar_sglang.calibration.calibrate import run_model
from oscar_sglang.calibration.datasets import resolve_data, split_sequences, token_stream
from oscar_sglang.calibration.kv_formats import KeyVariant, asymmetric_roundtrip
from oscar_sglang.calibration.models import load_model
from oscar_sglang.kernels.format import DEFAULT_SINK_TOKENS
from oscar_sglang.kernels.reference import clip_rows, rotate
from oscar_sglang.kernels.rotation_file import RotationSet

KEY_BITS = 2
MEAN_BITS = 16  # one fp16 mean per direction and block


def block_means(rotated: torch.Tensor, start: int, block: int) -> torch.Tensor:
    """rotated [B, H, L, D] -> per position the fp16-rounded mean of its direction over its block
    of `block` positions (blocks from `start`); zero outside whole blocks. float32, same shape."""
    out = torch.zeros_like(rotated, dtype=torch.float32)
    whole = (rotated.shape[2] - start) // block * block
    if whole > 0:
        span = rotated[:, :, start:start + whole].float().unflatten(2, (-1, block))  # [B,H,n,block,D]
        out[:, :, start:start + whole] = span.mean(3, keepdim=True).half().float().expand_as(span).flatten(2, 3)
    return out


class KeyMeans:
    """Attention handler (exact attention) collecting per layer the mean post-RoPE key of each KV
    head [H_kv, D] over positions >= sink."""

    def __init__(self, num_layers: int, sink: int):
        self.sink, self.sums, self.count = sink, [0.0] * num_layers, [0] * num_layers

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        check_unpadded(query, key, attention_mask)
        k = key[:, :, self.sink:].double()
        self.sums[module.layer_idx] = self.sums[module.layer_idx] + k.sum(dim=(0, 2))
        self.count[module.layer_idx] += k.shape[0] * k.shape[2]
        out = windowed_attention(query, key.float(), key.float(), value.float(), value.float(), scaling, 0, 0)
        return out.to(query.dtype), None

    def means(self) -> list[torch.Tensor]:
        return [(s / n).float() for s, n in zip(self.sums, self.count)]


class CenteredKeys(KeyVariant):
    """2-bit per-token keys of the rotated rows minus a mean (a block's or a calibrated one),
    clipped at `clip`; the served 2-bit values; Int2Format's windows."""

    def __init__(self, rotations: RotationSet, head_dim: int, clip: float | None,
                 block: int | None = None, means: list[torch.Tensor] | None = None):
        mean_name = f"block {block}" if block else "calibrated"
        clip_name = "file clips" if clip is None else f"clip {clip}"
        super().__init__(f"keys minus {mean_name} mean, {clip_name}", rotations, head_dim, key_bits=KEY_BITS)
        if block is not None and block > self.recent:
            raise ValueError(f"blocks of {block} positions exceed the {self.recent}-position recent window")
        self.clip, self.block, self.means = clip, block, means
        self.bits = self.mean_bits(KEY_BITS + self.format.meta_bits_per_element + (MEAN_BITS / block if block else 0))

    def quantize_keys(self, layer, rows):
        r = self.rotations
        clip = r.k_clip[layer] if self.clip is None else self.clip
        if self.block:
            mean = block_means(rows, self.sink, self.block)
        else:
            rotated = rotate(self.means[layer][None].to(rows.device), r.k_rot[layer].to(rows.device))[0]
            mean = rotated.half().float()[None, :, None, :].expand_as(rows)  # [1, H, 1, D] -> rows' shape
        return asymmetric_roundtrip(clip_rows(rows - mean, clip), KEY_BITS, rows.shape[-1]) + mean


def calibrated_means(args, sink: int) -> list[torch.Tensor]:
    """KeyMeans over --mean-tokens tokens from the start of --data, in sequences of --seq-len
    (the model loaded once more: the scoring's copy is not handed to variants)."""
    model, tokenizer, _ = load_model(args.model, args.gguf_file, args.device)
    stream = token_stream(tokenizer, resolve_data(args.data))
    collector = KeyMeans(model.config.num_hidden_layers, sink)
    run_model(model, split_sequences(stream, args.seq_len, args.mean_tokens // args.seq_len), collector,
              "oscar_key_means", "key means")
    return collector.means()


def parse_variant(text: str) -> tuple[str, float | None]:
    """"block64" / "calibrated", optionally ":CLIP" -> (kind, clip or None for the file's)."""
    kind, _, clip = text.partition(":")
    if kind != "calibrated" and not (kind.startswith("block") and kind[5:].isdigit()):
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected blockN or calibrated, optionally :CLIP")
    return kind, float(clip) if clip else None


def main(argv=None) -> int:
    p = simulation_parser(__doc__, "rotation file whose rotations (and clips) are used")
    p.add_argument("--variants", type=lambda s: [parse_variant(v) for v in s.split(",")], required=True,
                   help="comma list of blockN or calibrated, each optionally :CLIP (default: the file's clips)")
    p.add_argument("--mean-tokens", type=int, default=12288, help="calibration tokens for the calibrated mean")
    args = p.parse_args(argv)

    def variants(rotations, head_dim):
        means = None
        out = []
        for kind, clip in args.variants:
            if kind == "calibrated":
                if means is None:
                    means = calibrated_means(args, DEFAULT_SINK_TOKENS)
                out.append(CenteredKeys(rotations, head_dim, clip, means=means))
            else:
                out.append(CenteredKeys(rotations, head_dim, clip, block=int(kind[5:])))
        return out

    score_beside_served(args, argv, "key_means", "keys", variants,
                        "centered-key rows use its rotations, and its key clips unless a clip is given",
                        mean_tokens=args.mean_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
