#!/usr/bin/env bash
# KV-cache quality of one model on one GPU, as recorded in RESULTS.md ("Quality"): the server
# benchmark (benchmarks/quality_server.py) and, beside it on the same GPU, the accuracy harness
# on the same retrieval prompts; then the two compared prompt by prompt
# (benchmarks/quality_agreement.py). Retrieval haystacks and perplexity windows start at token
# 40,000 of the text, after the span the rotations were calibrated on.
#
# usage: bash benchmarks/quality.sh MODEL_DIR TEXT_DIR K2_ROTATIONS K4_ROTATIONS OUT_DIR
#   MODEL_DIR      HF checkpoint folder (SGLang serves it; the harness loads it with transformers)
#   TEXT_DIR       folder of .txt files, read in sorted order (the paul-graham-essays files)
#   K2_ROTATIONS   `oscar-sglang calibrate` artifact for 2-bit keys (configuration oscar)
#   K4_ROTATIONS   the same calibration with --key-bits 4 (configuration oscar-k4)
set -euo pipefail
MODEL=$1 TEXT=$2 K2=$3 K4=$4 OUT=$5
mkdir -p "$OUT"
mapfile -t DATA < <(ls "$TEXT"/*.txt | sort)
NAME=$(basename "$MODEL" | tr '[:upper:]' '[:lower:]')
RETRIEVAL=(--tasks passkey,multi-needle-one --lengths 1024,2048,4096,6000 --trials 40)

python3 -m benchmarks.quality_server --model-path "$MODEL" --data "${DATA[@]}" "${RETRIEVAL[@]}" \
    --configs bf16,oscar-k4,oscar,fp8 --rotations "$K2" --oscar-variant "k4=$K4" \
    --out-dir "$OUT" --logs-dir "$OUT/logs" > "$OUT/quality-server.log" 2>&1 &
SERVER=$!

python3 -m oscar_sglang evaluate --model "$MODEL" --data "${DATA[@]}" --device cuda "${RETRIEVAL[@]}" \
    --seq-len 2048 --sequences 4 --offset-tokens 40000 --out-dir "$OUT" \
    --rotations "$K2" --formats bf16,fp8,oscar --ablations --ablation-rotations "k4=$K4" \
    --name "$NAME" > "$OUT/evaluate.log" 2>&1
wait $SERVER || true
python3 -m benchmarks.quality_agreement --harness "$OUT/accuracy-$NAME.json" \
    --server "$OUT/quality-server-$NAME.json" --pairs bf16=bf16 fp8=fp8 oscar=oscar oscar-k4=oscar-k4 \
    > "$OUT/quality-agreement.log" 2>&1
