#!/usr/bin/env bash
# The closed-form audit on the shipped models, as reported in docs/closed_form.md: a WriteSAE trained with the demo's
# settings on one head, then `writesae closed-form` on 200 held-out prompts of 64 tokens (20 atoms, the appendix eps
# grid, horizons 0 1 4 16, 64 eval tokens). Usage: bash scripts/closed_form_shipped.sh OUT_DIR
set -euo pipefail
out=${1:-runs/closed-form-shipped}
mkdir -p "$out"
for cell in "qwen35-tiny 1 0" "mamba2-tiny 3 2"; do
    set -- $cell
    model=$1 layer=$2 head=$3
    writesae train --model "$model" --layer "$layer" --head "$head" --d-sae 256 --k 16 --context-size 128 \
        --training-tokens 512000 --batch-tokens 2048 --lr 2e-3 --warmup-steps 20 --out "$out/$model-sae" --overwrite
    writesae closed-form --model "$model" --sae "$out/$model-sae/sae" --layer "$layer" --head "$head" \
        --prompts 200 --prompt-len 64 --atoms 20 --out "$out/$model-closed-form" --overwrite
done
