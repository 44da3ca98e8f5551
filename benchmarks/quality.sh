#!/usr/bin/env bash
# KV-cache quality of one model on one GPU, as recorded in RESULTS.md ("Quality"): the server
# benchmark (benchmarks/quality_server.py) and, beside it on the same GPU, the accuracy harness
# on the same retrieval prompts; then the two compared prompt by prompt
# (benchmarks/quality_agreement.py). The rotation files come from benchmarks/key_objectives.py.
# Retrieval haystacks and perplexity windows start at token 40,000 of the text, after the span
# the rotations were calibrated on.
#
# usage: bash benchmarks/quality.sh MODEL_DIR TEXT_DIR ROTATIONS_DIR OUT_DIR
#   MODEL_DIR      HF checkpoint folder (SGLang serves it; the harness loads it with transformers)
#   TEXT_DIR       folder of .txt files, read in sorted order (the paul-graham-essays files)
#   ROTATIONS_DIR  NAME-{output-error,peak-kl,attention-kl,keys-unclipped}.oscar.safetensors
#                  (output-error is the calibrator's default objective: configuration oscar)
set -euo pipefail
MODEL=$1 TEXT=$2 ROT=$3 OUT=$4
mkdir -p "$OUT"
mapfile -t DATA < <(ls "$TEXT"/*.txt | sort)
art() { ls "$ROT"/*-"$1".oscar.safetensors; }
NAME=$(basename "$MODEL" | tr '[:upper:]' '[:lower:]')
RETRIEVAL=(--tasks passkey,multi-needle-one --lengths 1024,2048,4096,6000 --trials 40)

python3 -m benchmarks.quality_server --model-path "$MODEL" --data "${DATA[@]}" "${RETRIEVAL[@]}" \
    --configs bf16,oscar,oscar-data-free --rotations "$(art output-error)" \
    --oscar-variant "peak-kl=$(art peak-kl)" \
    --out-dir "$OUT" --logs-dir "$OUT/logs" > "$OUT/quality-server.log" 2>&1 &
SERVER=$!

EVAL=(python3 -m oscar_sglang evaluate --model "$MODEL" --data "${DATA[@]}" --device cuda "${RETRIEVAL[@]}"
      --seq-len 2048 --sequences 4 --offset-tokens 40000 --out-dir "$OUT")
"${EVAL[@]}" --rotations "$(art output-error)" --formats bf16,oscar --ablations \
    --ablation-rotations "peak-kl=$(art peak-kl)" --name "$NAME" > "$OUT/evaluate.log" 2>&1
"${EVAL[@]}" --rotations "$(art output-error)" --formats bf16,kivi2,int2-hadamard --ablations \
    --ablation-rotations "attention-kl=$(art attention-kl)" "keys-unclipped=$(art keys-unclipped)" \
    --name "$NAME-ablations" > "$OUT/evaluate-ablations.log" 2>&1
wait $SERVER || true
python3 -m benchmarks.quality_agreement --harness "$OUT/accuracy-$NAME.json" \
    --server "$OUT/quality-server-$NAME.json" > "$OUT/quality-agreement.log" 2>&1
