"""Keys per channel: does quantizing each rotated key direction over a block of tokens keep what
per-token codes lose? A harness simulation of a format the server does not have. Keys are read
through a rotation file's key rotations; then every rotated direction gets 2-bit asymmetric codes
over each block of `block` consecutive positions after the sinks (a scale and minimum per
direction and block, fp16 or with `--meta fp8` e4m3: KIVI's layout in OSCAR's rotated space, where
the calibrated directions differ in variance and a per-token scale cannot follow them). Values are
the served 2-bit values; sinks and recent positions stay exact (BF16), and the recent window covers
each sequence's partial last block.

`--bases` picks the directions: the file's rotations ("rotated", where the Hadamard mixing evens
out the directions' ranges), its query eigenbasis without the mixing ("eigen", U = R · (H · P_br)ᵀ,
where the ranges differ most) or the model's own key channels ("raw", KIVI's). The served format at
the file's key width runs beside it as the control. Scored by passkey retrieval (harness prompts,
Wilson intervals) and by perplexity, KL and top-1 against BF16 on held-out text. Writes
channel-keys-NAME.{json,md}.

    python -m benchmarks.channel_keys --model smollm2-135m-instruct --data paul-graham-essays \\
        --rotations benchmarks/results/smollm2-135m-instruct.oscar.safetensors --blocks 64,128
"""

import torch

from benchmarks.cli_args import choice_list, parse_int_list
from benchmarks.harness_args import score_beside_served, simulation_parser
from oscar_sglang.calibration.kv_formats import KeyVariant, asymmetric_roundtrip
from oscar_sglang.kernels.rotation_file import RotationSet, hadamard_bitrev

KEY_BITS = 2
BASES = ("rotated", "eigen", "raw")
META = {"fp16": torch.float16, "fp8": torch.float8_e4m3fn}  # scale and minimum per direction and block


def channel_roundtrip(rotated: torch.Tensor, start: int, block: int, bits: int,
                      meta_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Rotated keys [B, H, L, D] with positions [start, start + n·block) quantized per direction
    over each block of `block` positions (asymmetric, scale and minimum as `meta_dtype`) and
    dequantized; the other positions as given. float32, same shape."""
    out = rotated.float().clone()
    whole = (rotated.shape[2] - start) // block * block
    if whole > 0:
        span = rotated[:, :, start:start + whole].float().unflatten(2, (-1, block)).transpose(-1, -2)  # [B,H,n,D,block]
        out[:, :, start:start + whole] = asymmetric_roundtrip(span, bits, block, meta_dtype).transpose(-1, -2).flatten(2, 3)
    return out


class ChannelKeys(KeyVariant):
    """2-bit keys per rotated direction over blocks of `block` positions after the sinks, the
    served 2-bit values; Int2Format's windows."""

    def __init__(self, rotations: RotationSet, head_dim: int, block: int, basis: str = "rotated", meta: str = "fp16"):
        suffix = ("" if basis == "rotated" else f", {basis} directions") + ("" if meta == "fp16" else f", {meta} meta")
        super().__init__(f"channel keys, blocks of {block}{suffix}", rotations, head_dim, key_bits=KEY_BITS)
        mixing = hadamard_bitrev(head_dim)
        self.key_basis = [{"rotated": rot, "eigen": rot @ mixing.T, "raw": torch.eye(head_dim)[None]}[basis]
                          for rot in rotations.k_rot]
        if block > self.recent:
            raise ValueError(f"blocks of {block} positions exceed the {self.recent}-position recent "
                             "window that must hold each sequence's partial last block")
        self.block, self.meta_dtype = block, META[meta]
        self.bits = self.mean_bits(KEY_BITS + 2 * torch.finfo(self.meta_dtype).bits / block)

    def key_rotation(self, layer):
        return self.key_basis[layer]

    def quantize_keys(self, layer, rows):
        return channel_roundtrip(rows, self.sink, self.block, KEY_BITS, self.meta_dtype)


def main(argv=None) -> int:
    p = simulation_parser(__doc__, "rotation file whose rotations (and the control's clips) are used")
    p.add_argument("--blocks", type=parse_int_list, required=True, help="positions per key block, e.g. 64,128")
    p.add_argument("--bases", type=choice_list(BASES, "bases"), default=["rotated"],
                   help=f"comma list of key directions to quantize along, of {','.join(BASES)} (default rotated)")
    p.add_argument("--meta", choices=sorted(META), default="fp16",
                   help="storage of each direction's scale and minimum per block (default fp16)")
    args = p.parse_args(argv)
    score_beside_served(args, argv, "channel_keys", "keys",
                        lambda rotations, head_dim: [ChannelKeys(rotations, head_dim, b, basis, args.meta)
                                                     for basis in args.bases for b in args.blocks],
                        "channel-key rows ignore its key clips")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
