#!/usr/bin/env bash
# CoachLM (Liu et al., ICDE 2024, arXiv 2311.13246) at a tiny size, on the CPU, with the embedded local models:
#
#   expert revisions ─ prepare ─ train a coach (LoRA on gemma-3-270m) ─┐
#                                                                      ├─ revise held-out Alpaca pairs ─ report
#   the same pairs ─ rate (Qwen 0.5B, 0-5) ──────────────────────────────┘  (rated again after revision)
#
#   bash examples/coachlm.sh                 # everything goes to runs/coachlm (OUT=... to change)
#
# Steps are ordinary datatailor commands: re-running the script resumes (finished runs are not redone and a
# trained coach is kept). For real use: the default alpha 0.3 with descending revision size (the paper's top 30 %
# of 2,301), `--preset coachlm_coach` without the CPU scale-down (7 epochs, batch 32, LR 2e-4, LoRA r 64) on a
# 6-7B base with a GPU, and every pair of your dataset as the input of the revision recipe.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="$(mkdir -p "${OUT:-runs/coachlm}" && cd "${OUT:-runs/coachlm}" && pwd)"
PAIRS="${PAIRS:-3}"          # held-out pairs to revise
TRAIN="${TRAIN:-8}"          # expert revisions to train the tiny coach on

# 1. The coach's training set: repairs, revision sizes, a held-out split never trained on, the top alpha by size.
#    The tiny demo takes the smallest revisions (short texts train fast on a CPU); the paper takes the largest.
datatailor coach prepare --out "$OUT/prepared" --holdout 20 --alpha 0.3 --direction ascending

# 2. Train the coach: the paper's LoRA preset, scaled down for a CPU (few pairs, 2 epochs, short sequences).
if [ ! -f "$OUT/coach/train_report.json" ]; then
  datatailor train --data "$OUT/prepared/train.jsonl" --base local:gemma-3-270m --preset coachlm_coach \
    --limit "$TRAIN" --epochs 2 --batch-size 4 --lora-r 16 --max-length 512 --out "$OUT/coach"
fi

# 3. Rate the held-out raw pairs, revise them with the coach (greedy), rate them again: one recipe.
cat > "$OUT/revise.yaml" <<YAML
name: coachlm-revise
seed: 0
input:
  path: $OUT/prepared/heldout.jsonl   # raw Alpaca pairs, each with its expert revision for comparison
  limit: $PAIRS
models:
  coach:                              # the trained coach: base + adapter, as train_report.json says
    backend: hf
    model: local:gemma-3-270m
    adapter: $OUT/coach
    temperature: 0.0
    max_tokens: 384
  judge:                              # the 0-5 rater (the paper used ChatGPT)
    backend: llamacpp
    model: local:qwen2.5-coder-0.5b-instruct
    temperature: 0.0
    max_tokens: 32
stages:
  - type: quality.rate                # before
    role: judge
  - type: coach.revise                # a revision that does not parse or is degenerate keeps the original, with the reason
    role: coach
  - type: quality.rate                # after
    name: rate-after
    role: judge
    key: quality_after
YAML
datatailor run "$OUT/revise.yaml" --out "$OUT/revised"

# 4. The report: share revised, edit distances, why originals were kept, quality before/after, closeness to the experts.
echo "report: $OUT/revised/reports/coachlm_report.html"
cat "$OUT/revised/reports/coachlm_report.md"
