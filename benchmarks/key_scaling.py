"""Whether a per-direction key scale buys retrieval at 2-bit keys: a harness simulation of a
non-orthogonal key transform the served format does not have.

An orthogonal rotation leaves the mean score error of per-token quantization at
(Σ_c λ_c)(Σ_c s_c²) up to a constant, with λ_c the query variance and s_c² the key variance along
direction c of the query eigenbasis (the rotation spreads every direction but the first evenly
over the dims). Scaling keys by 1/a_c before the spreading, and queries by a_c, changes it to
(Σ λ_c a_c²)(Σ s_c² / a_c²), least at a_c² = s_c / √λ_c (power 0.5 below): the key budget moves to
the directions the queries read. Each --variants POWERxCLIP quantizes 2-bit keys as
q̂ = quant(clip(k · U diag(a^-1) H P_br)) with a_c = (s_c / √λ_c)^(2·POWER) and the first
direction unscaled, λ and s from --calibration-tokens tokens of --data from token 0 (the rotation
file's own calibration slice); values as the rotation file stores them. Scored against the file's
2-bit keys as served: perplexity, KL and top-1 against BF16 on held-out text, and passkey
retrieval (Wilson intervals). Writes key-scaling-NAME.{json,md}.

    python -m benchmarks.key_scaling --model smollm2-135m-instruct --data paul-graham-essays \\
        --rotations benchmarks/results/smollm2-135m-instruct.oscar.safetensors --variants 0.5x1.0,0.5x0.92
"""

import argparse

import torch

from benchmarks.cli_args import pairs_of
from benchmarks.harness_args import (
    add_harness_args,
    add_scoring_args,
    model_and_rotations,
    score_formats,
    write_formats_report,
)
from oscar_sglang.calibration.calibrate import run_model
from oscar_sglang.calibration.covariance import CovarianceAccumulator
from oscar_sglang.calibration.datasets import resolve_data, split_sequences, token_stream
from oscar_sglang.calibration.kv_formats import Int2Format, KVFormat, asymmetric_roundtrip, from_tokens, to_tokens
from oscar_sglang.calibration.models import geometry
from oscar_sglang.kernels.format import DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS
from oscar_sglang.kernels.reference import clip_rows
from oscar_sglang.kernels.rotation_file import RotationSet, hadamard_bitrev

KEY_BITS = 2


# "0.5x1.0,0.5x0.92" -> [(0.5, 1.0), (0.5, 0.92)]: scale power x key clip ratio (0 < clip <= 1)
parse_variants = pairs_of(float, lambda pair: 0 < pair[1] <= 1, "POWERxCLIP pairs such as 0.5x1.0,0.5x0.92")


def key_transforms(c_q: torch.Tensor, c_k: torch.Tensor, power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """c_q (query second moments per KV group), c_k (key second moments): [H, D, D] ->
    (M, M⁻¹) [H, D, D] float32 with M = U diag(1/a) H P_br, U the query eigenvectors in descending
    order, a_c = (s_c / √λ_c)^(2·power), a_0 = 1."""
    lam, u = torch.linalg.eigh(c_q.double())
    lam, u = lam.flip(-1).clamp_min(1e-12), u.flip(-1)
    s2 = torch.diagonal(u.transpose(-1, -2) @ c_k.double() @ u, dim1=-2, dim2=-1).clamp_min(1e-12)
    a = (s2.sqrt() / lam.sqrt()) ** power
    a[..., 0] = 1.0
    mix = hadamard_bitrev(c_q.shape[-1]).double()
    forward = u @ torch.diag_embed(1 / a) @ mix
    backward = mix.T @ torch.diag_embed(a) @ u.transpose(-1, -2)
    return forward.float(), backward.float()


class ScaledKeys(Int2Format):
    """2-bit keys in the scaled query eigenbasis (key_transforms), clipped at `clip`, one
    quantization group per head; values and the BF16 windows as `rotations` serves them."""

    def __init__(self, rotations: RotationSet, head_dim: int, transforms, power: float, clip: float):
        super().__init__(f"scaled-p{power:g}-clip{clip:g}", rotations, head_dim, key_bits=KEY_BITS)
        self.transforms, self.clip = transforms, clip

    def kv(self, layer, key, value):
        k_exact, _, v_exact, v_quant = super().kv(layer, key, value)
        forward, backward = (t.to(key.device) for t in self.transforms[layer])
        scaled = torch.einsum("thd,hde->the", to_tokens(key).float(), forward)
        quant = asymmetric_roundtrip(clip_rows(scaled, self.clip), KEY_BITS, scaled.shape[-1])
        k_quant = from_tokens(torch.einsum("the,hed->thd", quant, backward), key.shape[0])
        return k_exact, k_quant, v_exact, v_quant


def second_moments(model, tokenizer, files, tokens: int, seq_len: int):
    """Per layer (C_Q, C_K) [H_kv, D, D] float64 over the first `tokens` tokens of `files`."""
    acc = CovarianceAccumulator(geometry(model.config), DEFAULT_SINK_TOKENS, DEFAULT_RECENT_TOKENS,
                                next(model.parameters()).device)
    run_model(model, split_sequences(token_stream(tokenizer, files), seq_len, -(-tokens // seq_len)), acc,
              "oscar_key_scaling", "second moments")
    return list(zip(acc.matrices("attention", False)[0], acc.matrices("plain", False)[0]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_harness_args(p)
    p.add_argument("--rotations", required=True, help="rotation file calibrated for 2-bit keys")
    p.add_argument("--variants", type=parse_variants, required=True, help="POWERxCLIP pairs, e.g. 0.5x1.0,0.5x0.92")
    p.add_argument("--calibration-tokens", type=int, default=12288, help="tokens for λ and s (default %(default)s)")
    add_scoring_args(p)
    args = p.parse_args(argv)
    model, tokenizer, name, geo, rotations = model_and_rotations(args)
    files = resolve_data(args.data)
    with torch.inference_mode():
        moments = second_moments(model, tokenizer, files, args.calibration_tokens, args.seq_len)
    formats = [KVFormat(), Int2Format("file", rotations, geo.head_dim, key_bits=KEY_BITS)]
    for power, clip in args.variants:
        transforms = [key_transforms(c_q, c_k, power) for c_q, c_k in moments]
        formats.append(ScaledKeys(rotations, geo.head_dim, transforms, power, clip))
    stream = token_stream(tokenizer, files)
    rows = score_formats(model, tokenizer, formats, stream, args)
    write_formats_report(args, argv, "key_scaling", name, rows, "keys",
                         [f"rotations: {args.rotations} ({rotations.metadata.get('calibration_source')}); "
                          f"λ and s from tokens 0-{args.calibration_tokens - 1}"], rotations=dict(rotations.metadata))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
