#!/usr/bin/env bash
# The partition comparisons on the shipped models, as reported in docs/dictionary.md: WriteSAEs with the demo's recipe
# and three seeds on qwen35-tiny layer 1 head 0 and mamba2-tiny layer 3 head 2, each partitioned on the demo's 48
# held-out passages of 128 tokens; then the seeds of each cell compared (class-count CV, atom matching), and the
# two architectures compared (KS tests of the firing-level cosines, cluster bootstrap, Holm over the contrasts).
# Usage: bash scripts/partition_compare_shipped.sh OUT_DIR
set -euo pipefail
out=${1:-runs/partition-compare-shipped}
mkdir -p "$out"
T="--d-sae 256 --k 16 --context-size 128 --training-tokens 512000 --batch-tokens 2048 --lr 2e-3 --warmup-steps 20"
runs=()
for cell in "qwen35-tiny 1 0 q" "mamba2-tiny 3 2 m"; do
    set -- $cell
    model=$1 layer=$2 head=$3 short=$4
    seeds=()
    for seed in 42 43 44; do
        writesae train --model "$model" --layer "$layer" --head "$head" $T --seed "$seed" --out "$out/$short-sae-$seed" \
            --overwrite
        writesae partition --model "$model" --sae "$out/$short-sae-$seed/sae" --layer "$layer" --head "$head" \
            --passages 48 --passage-len 128 --bits-passages 0 --out "$out/$short-part-$seed" --overwrite
        seeds+=("$short$seed=$out/$short-part-$seed")
    done
    writesae partition-compare --runs "${seeds[@]}" --seeds --out "$out/$short-seeds" --overwrite
    runs+=("${seeds[@]}")
done
# across architectures: seed 42 of each, and all six runs (15 contrasts)
writesae partition-compare --runs "q42=$out/q-part-42" "m42=$out/m-part-42" --out "$out/architectures" --overwrite
writesae partition-compare --runs "${runs[@]}" --out "$out/all-runs" --overwrite
