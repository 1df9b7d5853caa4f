#!/usr/bin/env bash
# The whole loop at a tiny size, on the CPU, with the embedded local models (no key, no network):
#
#   CodecLM data ─┐                                            ┌─ eval vs the strong model ─┐
#                 ├─ export (decontaminated) ─ train target ───┤                             ├─ compare → report.html
#   Self-Instruct ┘   (same data budget: budget_pairs: 4)      └─ rate data quality ─────────┘
#
#   bash examples/loop.sh                 # everything goes to runs/loop (OUT=... to change)
#   ITEMS=10 bash examples/loop.sh        # evaluate on more Vicuna questions
#
# Each step is an ordinary datatailor command, so any step can be re-run on its own; re-running the
# script resumes: finished model calls come from the request cache and finished runs are not redone.
# Measured on 2 busy CPU cores with ITEMS=2: data 5–15 min per method, training 5–8 min per method
# (4 pairs, 3 LoRA steps), evaluation 3–7 min per test item per method (the tuned target runs on the hf
# backend), rating ~1.5 min per method; the whole loop ~45–60 min from an empty cache. For real use, raise budget_pairs in the two recipes,
# drop --limit, and point the models at bigger ones (examples/codec_openai.yaml).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-runs/loop}"
ITEMS="${ITEMS:-4}"          # Vicuna-80 questions to evaluate on
TESTSETS="vicuna80,selfinstruct252,mtbench,coachlm150"

# 1. Data: CodecLM and the Self-Instruct baseline, same seeds and same data budget (budget_pairs: 4).
#    Exit 4 means the run finished but delivered fewer pairs than asked (it says which stage and why):
#    the loop goes on with what there is, and the comparison report shows each run's size.
run_data() { datatailor run "$@" || { code=$?; [ "$code" -eq 4 ] || exit "$code"; }; }
run_data "$HERE/codec.yaml" --out "$OUT/codec"
run_data "$HERE/self_instruct.yaml" --out "$OUT/self_instruct"

for method in codec self_instruct; do
  pairs=$(grep -c . "$OUT/$method/data.jsonl" || true)
  if [ "$pairs" -eq 0 ]; then
    # At this tiny size a method can keep nothing; the report still shows the run (its calls, and why
    # pairs were dropped: $OUT/$method/failures.jsonl and, for CodecLM, its report in $OUT/$method/stages/).
    echo "$method: no pairs kept; skipping its training and evaluation (see $OUT/$method/failures.jsonl)" >&2
    continue
  fi
  # 2. Training file: drop any pair that overlaps a shipped test set (the dropped pairs are listed in
  #    $OUT/$method.train.decontam.json).
  datatailor export "$OUT/$method" --out "$OUT/$method.train.jsonl" --format alpaca --decontaminate "$TESTSETS"

  # 3. Fine-tune the target (LoRA on CPU; train_report.json says how to load the result). A finished
  #    training is kept on a re-run (train refuses to overwrite a model without --force).
  if [ ! -f "$OUT/$method-tuned/train_report.json" ]; then
    datatailor train --data "$OUT/$method.train.jsonl" --base local:gemma-3-270m --out "$OUT/$method-tuned"
  fi

  # 4. Evaluate the tuned target against the strong model that wrote its data (CodecLM's protocol):
  #    answers from both, judged by the strong model in both orders at temperature 0; CRR (strict rule),
  #    WR1/WR2/QS and the judge's position consistency land in $OUT/$method/eval-vicuna80/eval.{json,md}.
  #    The strong model's answers are cached, so the second method reuses them.
  datatailor eval --testset vicuna80 --limit "$ITEMS" \
    --models "$HERE/codec.yaml" --candidate "hf:$OUT/$method-tuned" --reference role:strong --judge role:strong \
    --max-tokens 64 --judge-max-tokens 16 --out "$OUT/$method/eval-vicuna80"

  # 5. Data quality: AlpaGasus-style 0–5 rating of every pair by the strong model ($OUT/$method/quality).
  datatailor rate "$OUT/$method" --models "$HERE/codec.yaml" --judge role:strong --max-tokens 32
done

# 6. One self-contained HTML page: size, calls and $ per kept pair, quality, diversity, contamination, CRR/WR.
datatailor compare "$OUT/codec" "$OUT/self_instruct" --out "$OUT/report.html"
echo "open $OUT/report.html"
