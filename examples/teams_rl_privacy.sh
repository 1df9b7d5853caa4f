#!/usr/bin/env bash
# The privacy check TeaMs-RL reports (Gu et al., arXiv 2403.08694): fine-tune the target on TeaMs-RL data and on
# Evol-Instruct data of the same size from the same seeds, then attack each tuned model with loss-based membership
# inference (`datatailor privacy`): ROC AUC 0.5 means the model does not reveal which pairs it was trained on; the
# paper reports an AUC closer to 0.5 for TeaMs-RL (0.47 vs 0.72 in a third-party summary).
#
#   bash examples/teams_rl_privacy.sh          # runs/teams-privacy (OUT=...); PAIRS=8 members + 8 non-members
#
# On the CPU with the embedded models at a tiny size (about 15-25 minutes on 2 cores): 8 + 8 pairs give a very noisy
# AUC; the figure exercises the check, it does not reproduce the paper's. For real use raise PAIRS and SEEDS and
# point the models at the paper's (examples/teams_rl_openai.yaml).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="$(mkdir -p "${OUT:-runs/teams-privacy}" && cd "${OUT:-runs/teams-privacy}" && pwd)"
PAIRS="${PAIRS:-8}"
SEEDS="${SEEDS:-6}"
BUDGET=$((2 * PAIRS))   # half trained on (members), half held out (non-members)

qwen() { printf '    backend: llamacpp\n    model: local:qwen2.5-coder-0.5b-instruct\n    temperature: %s\n    max_tokens: %s\n' "$1" "$2"; }

# 1. The two datasets, same seeds, same size. Neither side uses the information-gain check: the 0.5B model judges
#    every rewrite "Equal" to its prompt, which would eliminate every evolution (TeaMs-RL: elimination: false).
{
  echo "name: teams-rl-privacy"; echo "seed: 0"; echo "budget_pairs: $BUDGET"
  echo "input: {path: $HERE/data/self_instruct_seeds.jsonl, limit: $SEEDS}"
  echo "models:"; echo "  rewriter:"; qwen 0.0 120; echo "  reviewer:"; qwen 0.0 8; echo "  expert:"; qwen 0.7 200
  echo "stages:"
  echo "  - {type: teams.train, updates: 2, n_envs: 2}"
  echo "  - {type: teams.generate, schedule: official, keep: all, elimination: false, respond_template: $HERE/templates/short_answer.j2}"
  echo "  - {type: select, strategy: random}"
} > "$OUT/teams.yaml"
{
  echo "name: evol-privacy"; echo "seed: 0"; echo "budget_pairs: $BUDGET"
  echo "input: {path: $HERE/data/self_instruct_seeds.jsonl, limit: $SEEDS}"
  echo "models:"; echo "  strong:"; qwen 0.7 200
  echo "stages:"
  echo "  - {type: evol.evolve, rounds: 6, information_gain_check: false, respond_template: $HERE/templates/short_answer.j2}"
  echo "  - {type: select, strategy: random}"
} > "$OUT/evol.yaml"
for method in teams evol; do
  datatailor run "$OUT/$method.yaml" --out "$OUT/$method" || { code=$?; [ "$code" -eq 4 ] || exit "$code"; }
done
# Both targets see the same number of pairs: the smaller dataset's size decides (a shortfall shows here).
n_teams=$(grep -c . "$OUT/teams/data.jsonl" || true)
n_evol=$(grep -c . "$OUT/evol/data.jsonl" || true)
n=$(( n_teams < n_evol ? n_teams : n_evol ))
half=$((n / 2))
echo "pairs: TeaMs-RL $n_teams, Evol-Instruct $n_evol of $BUDGET asked; each target trains on $half and is tested on $half more"
[ "$half" -ge 2 ] || { echo "too few pairs to compare (raise SEEDS)" >&2; exit 4; }
for method in teams evol; do
  head -n "$half" "$OUT/$method/data.jsonl" > "$OUT/$method.members.jsonl"
  head -n "$((2 * half))" "$OUT/$method/data.jsonl" | tail -n "$half" > "$OUT/$method.nonmembers.jsonl"
  # 2. The same training settings for both targets.
  tuned="$OUT/$method-tuned-$half"
  if [ ! -f "$tuned/train_report.json" ]; then
    datatailor train --data "$OUT/$method.members.jsonl" --base local:gemma-3-270m --out "$tuned" \
      --epochs 3 --batch-size 2 --max-length 384
  fi
  # 3. Membership inference against the tuned target.
  datatailor privacy --model "$tuned" --members "$OUT/$method.members.jsonl" \
    --nonmembers "$OUT/$method.nonmembers.jsonl" --out "$OUT/$method.privacy.json"
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for method in ("teams", "evol"):
    r = json.loads((out / f"{method}.privacy.json").read_text())
    print(f"{method:6s} AUC {r['auc']:.3f}  ({r['n_members']} members, {r['n_nonmembers']} non-members)")
PY
