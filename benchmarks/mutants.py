"""Mutation check: does the test suite notice when a method's rule is broken?

Each mutant is a one-line change to a rule of a method (a threshold's comparison, a temperature, a sampling or
pairing rule). For each, the script copies the repository to a temporary folder, applies the change, runs the
offline test suite there (`pytest -x -m "not integration and not ray"`: the Ray tests start clusters and guard
the executor, not a method's rule) and reports whether the suite failed ("caught") or
passed ("SURVIVED"). A surviving mutant is a missing test.

    python benchmarks/mutants.py                 # every mutant
    python benchmarks/mutants.py --only gap      # mutants whose name contains "gap"
    python benchmarks/mutants.py --only refed,coach,teams,dedup,bakeoff
    python benchmarks/mutants.py --list

Each mutant names the test files meant to catch it; those run instead of the whole suite (a failure there is a
failure of the suite, so "caught" holds; "SURVIVED" then means those files missed it: check with the whole suite,
`python benchmarks/mutants.py --only NAME tests/`). The unchanged files must pass first; when they do not, the
script prints pytest's output and stops.

Exit status 1 when any mutant survives. Run from the repository root, in the project's virtualenv.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    what: str
    tests: tuple[str, ...] = ()  # test files that should catch it, run instead of the whole suite (faster; a
    #                              failure there is a failure of the suite); empty: the whole offline suite


# Every mutant names the test files meant to catch it (a suite that catches it there catches it whole; the whole
# offline suite takes ~12 minutes on 2 cores, and one timing-sensitive test in it can fail under heavy load).
MUTANTS = [
    Mutant("gap-threshold-ge", "src/datatailor/stages/codec/contrastive.py",
           "if abs(scores.gap) > cfg.threshold:", "if abs(scores.gap) >= cfg.threshold:",
           "CodecLM keeps a pair when |G| ≥ 3 instead of |G| > 3", ('tests/test_codec.py',)),
    Mutant("encode-temperature", "src/datatailor/stages/codec/pool.py",
           'temperature: float | None = Field(0.7, description="Sampling temperature (paper: 0.7).")',
           'temperature: float | None = Field(None, description="Sampling temperature (paper: 0.7).")',
           "the encoder samples at the model's temperature instead of 0.7", ('tests/test_codec.py',)),
    # The decoder's Field line is shared by several configs, so this one changes its call instead.
    Mutant("decode-temperature", "src/datatailor/stages/codec/generation.py",
           "parse=parse_instruction_list, seed_key=key,\n            temperature=self.config.temperature,",
           "parse=parse_instruction_list, seed_key=key,\n            temperature=None,",
           "the decoder samples at the model's temperature instead of 0.7", ('tests/test_codec.py',)),
    Mutant("improve-temperature", "src/datatailor/stages/codec/contrastive.py",
           'improve_temperature: float | None = Field(0.7,', 'improve_temperature: float | None = Field(None,',
           "the contrastive loop's improver samples at the model's temperature instead of 0.7", ('tests/test_codec.py',)),
    Mutant("judge-temperature", "src/datatailor/stages/codec/contrastive.py",
           'judge_temperature: float | None = Field(0.0,', 'judge_temperature: float | None = Field(0.7,',
           "the contrastive scorer samples at 0.7 instead of 0", ('tests/test_codec.py',)),
    Mutant("eval-judge-temperature", "src/datatailor/evaluate/evaluation.py",
           '"output": JUDGE_OUTPUT, "temperature": 0.0,', '"output": JUDGE_OUTPUT, "temperature": 0.7,',
           "the evaluation judge samples at 0.7 instead of 0", ('tests/test_eval_cli.py',)),
    Mutant("first-action", "src/datatailor/stages/codec/generation.py",
           "index = rng.randrange(len(data.actions))", "index = 0",
           "always the first Self-Rubrics action instead of a uniform choice", ('tests/test_codec.py',)),
    Mutant("rubric-pairing", "src/datatailor/stages/codec/generation.py",
           "data.rubrics[index] if index < len(data.rubrics) else None",
           "data.rubrics[(index + 1) % len(data.rubrics)] if data.rubrics else None",
           "an action is reported with the next action's rubric", ('tests/test_codec.py',)),
    Mutant("rubric-parse-pairing", "src/datatailor/stages/codec/parsers.py",
           "return rubrics[:n], actions[:n]", "return rubrics[:n], actions[::-1][:n]",
           "parsed actions are paired with the wrong rubrics", ('tests/test_codec.py',)),
    Mutant("skills-with-replacement", "src/datatailor/stages/codec/pool.py",
           "chosen = set(rng.sample(skills_union, k))", "chosen = set(rng.choices(skills_union, k=k))",
           "augmentation samples skills with replacement", ('tests/test_codec.py',)),
    Mutant("self-instruct-rouge-0.75", "src/datatailor/stages/baselines.py",
           'rouge_threshold: float = Field(0.7,', 'rouge_threshold: float = Field(0.75,',
           "Self-Instruct's ROUGE-L novelty threshold moved from 0.7 to 0.75", ('tests/test_baselines.py',)),
    Mutant("self-instruct-rouge-strict", "src/datatailor/stages/baselines.py",
           "if similarity >= cfg.rouge_threshold:", "if similarity > cfg.rouge_threshold:",
           "Self-Instruct keeps a candidate at exactly ROUGE-L 0.7", ('tests/test_baselines.py',)),
    Mutant("self-instruct-min-words", "src/datatailor/stages/baselines.py",
           "min_words: int = Field(4, ge=1,", "min_words: int = Field(3, ge=1,",
           "Self-Instruct keeps 3-word instructions (Alpaca drops them)", ('tests/test_baselines.py',)),
    Mutant("score-pair-denominator", "src/datatailor/llm/structured.py",
           '    line = _DENOMINATOR.sub(r"\\1", line)\n', "",
           '"8/10" is read as the pair (8, 10)', ('tests/test_structured.py',)),
    Mutant("strict-rule-lenient", "src/datatailor/scoring/judge.py",
           'return first if first == second and first != "tie" else "tie"',
           'return first if first != "tie" else second',
           "the strict rule (win both orders) becomes lenient", ('tests/test_eval_cli.py',)),
    Mutant("evol-equal-reader", "src/datatailor/stages/evolve.py",
           "return not _NAMES_A_DIFFERENCE.search(t[m.end():])", "return True",
           'an "Equal, but …" reply is read as Equal', ('tests/test_evolve.py',)),
    # REFED, CoachLM, TeaMs-RL, dedup and the bake-off
    Mutant("refed-feedback-temperature", "src/datatailor/stages/refed/feedback.py",
           'temperature: float | None = Field(1.0, description="Sampling temperature (the paper\'s code: 1.0).")',
           'temperature: float | None = Field(None, description="Sampling temperature (the paper\'s code: 1.0).")',
           "REFED's reference-level feedback samples at the model's temperature instead of 1.0", ("tests/test_refed.py",)),
    Mutant("refed-per-feature", "src/datatailor/stages/refed/synthesis.py",
           "per_feature: int = Field(10, ge=1,", "per_feature: int = Field(5, ge=1,",
           "REFED synthesizes 5 instructions per feature call instead of the paper's 10", ("tests/test_refed.py",)),
    Mutant("coach-revise-below-strict", "src/datatailor/stages/coach/revise.py",
           "rating >= cfg.revise_below", "rating > cfg.revise_below",
           "CoachLM revises a pair rated exactly revise_below (4.5 is high quality, left alone)", ("tests/test_coach.py",)),
    Mutant("coach-alpha-direction", "src/datatailor/stages/coach/prepare.py",
           'sign = -1 if direction == "descending" else 1', 'sign = 1 if direction == "descending" else -1',
           "CoachLM's α share takes the smallest revisions instead of the largest", ("tests/test_coach.py",)),
    Mutant("teams-reward-always", "src/datatailor/stages/teams/env.py",
           "reward = 1.0 if not_equal else 0.0", "reward = 1.0",
           "TeaMs-RL rewards every rewrite, even one the reviewer calls equal", ("tests/test_teams.py",)),
    Mutant("teams-rewriter-temperature", "src/datatailor/stages/teams/stages.py",
           'rewriter_temperature: float | None = Field(0.7, description=',
           'rewriter_temperature: float | None = Field(None, description=',
           "TeaMs-RL's generation rewriter samples at the model's temperature instead of 0.7", ("tests/test_teams.py",)),
    Mutant("dedup-near-strict", "src/datatailor/scoring/dedup.py",
           "/ self.num_perm >= self.threshold:", "/ self.num_perm > self.threshold:",
           "near-duplicate dedup keeps a record at exactly the Jaccard threshold (datasketch drops it)",
           ("tests/test_dedup_parity.py",)),
    Mutant("bakeoff-split-unseeded", "src/datatailor/bakeoff/split.py",
           'derive_seed("bakeoff-split", testset.name, seed)', 'derive_seed("bakeoff-split", testset.name, 0)',
           "the bake-off's seed/evaluation split ignores the seed", ("tests/test_bakeoff.py",)),
    Mutant("bakeoff-split-rounding", "src/datatailor/bakeoff/split.py",
           "math.floor(share * len(records) + 0.5)", "math.floor(share * len(records))",
           "the seed part is rounded down instead of to the nearest", ("tests/test_bakeoff.py",)),
    Mutant("bakeoff-decontam-after-select", "src/datatailor/bakeoff/run.py",
           "    while at and isinstance(stages[at - 1], dict)", "    while False and isinstance(stages[at - 1], dict)",
           "the bake-off decontaminates after the recipe's own selection (a dropped pair is lost, not replaced)",
           ("tests/test_bakeoff.py",)),
    Mutant("bakeoff-bootstrap-unpaired", "src/datatailor/bakeoff/stats.py",
           "samples = values[:, idx].mean(axis=2)  # methods × resamples",
           "samples = np.stack([values[i, np.random.default_rng(seed + i).integers(0, n, size=(resamples, n))].mean(axis=1) "
           "for i in range(len(methods))])",
           "the bootstrap resamples each method's items independently instead of the same items for all",
           ("tests/test_bakeoff.py",)),
    # -- audit fixes (issue 16): REFED, CodecLM and the method reports --
    # the two REFED breaks the audit found
    Mutant("refed-sample-feedback-lost", "src/datatailor/stages/refed/synthesis.py",
           'feedback = data.sample_feedback if cfg.feedback == "sample" else data.response_feedback',
           "feedback = data.response_feedback",
           "the sample-level feedback ablation does not reach the improvement step (every improve call gets nothing)",
           ("tests/test_refed.py",)),
    Mutant("refed-worked-example-wrong-part", "src/datatailor/prompts/refed/respond.j2",
           "{% block shot_1_assistant %}\n{{ metadata.refed.reference_response }}",
           "{% block shot_1_assistant %}\n{{ metadata.refed.reference_instruction }}",
           "the worked example's answer shows the reference instruction instead of its response", ("tests/test_refed.py",)),
    # new breaks: REFED, CodecLM, the method reports and compare
    Mutant("refed-every-pass-same-order", "src/datatailor/stages/refed/references.py",
           'self.ctx.rng("draw", draw_pass).shuffle(order)', 'self.ctx.rng("draw", 1).shuffle(order)',
           "every pass over the references draws them in the first pass's order instead of a new seeded one",
           ("tests/test_refed.py", "tests/test_reports_final_rows.py")),
    Mutant("refed-top-up-ignores-keep-rate", "src/datatailor/stages/refed/references.py",
           "pairs = min(pairs, -(-deficit * asked // kept))", "pairs = min(pairs, deficit)",
           "a top-up round asks for the missing pairs only, as if every pair asked for were kept",
           ("tests/test_refed.py", "tests/test_reports_final_rows.py")),
    Mutant("refed-report-not-drawn-counts-redraws", "src/datatailor/report/refed.py",
           '"not_drawn": available - distinct,', '"not_drawn": available - len(references),',
           "the report's references not drawn subtract the second pass's draws too",
           ("tests/test_refed.py", "tests/test_reports_final_rows.py")),
    Mutant("refed-report-improved-means-drafted", "src/datatailor/report/refed.py",
           'improved = [r for r in kept if _ns(r).get("analysis") is not None]',
           'improved = [r for r in kept if _ns(r).get("draft")]',
           "the report counts a drafted pair as improved (the ablation without improvement reports improved pairs)",
           ("tests/test_refed.py", "tests/test_reports_final_rows.py")),
    Mutant("refed-report-rouge-boundary", "src/datatailor/report/refed.py",
           "sum(1 for s in similarity if s >= 0.7)", "sum(1 for s in similarity if s > 0.7)",
           "the report's count of instructions at ROUGE-L 0.7 or more with their reference leaves out exactly 0.7",
           ("tests/test_refed.py", "tests/test_reports_final_rows.py")),
    Mutant("refed-report-paper-calls", "src/datatailor/report/refed.py",
           "PAPER_CALLS_PER_PAIR = (2 + 42) / 20", "PAPER_CALLS_PER_PAIR = (2 + 40) / 20",
           "the paper's calls per pair printed beside the run's forget the two synthesis calls",
           ("tests/test_refed.py", "tests/test_reports_final_rows.py")),
    Mutant("codec-report-kept-share-of-entered", "src/datatailor/report/codec.py",
           '"kept_share": _share(len(kept_i), scored),', '"kept_share": _share(len(kept_i), entered),',
           "the CodecLM report's kept share per iteration is of the instructions that entered it, not of those scored",
           ("tests/test_codec.py", "tests/test_reports_final_rows.py")),
    Mutant("codec-top-up-keep-rate-floor", "src/datatailor/stages/codec/generation.py",
           "MIN_KEEP_RATE = 0.25", "MIN_KEEP_RATE = 0.5",
           "a CodecLM top-up round after a round that kept almost nothing asks for 2x the deficit instead of 4x",
           ("tests/test_codec.py", "tests/test_reports_final_rows.py")),
    Mutant("codec-select-spread-smallest-gap", "src/datatailor/stages/codec/select.py",
           "queues = [sorted(ids, key=lambda i: (-abs_gap(records[i]), i)) for ids in groups.values()]",
           "queues = [sorted(ids, key=lambda i: (abs_gap(records[i]), i)) for ids in groups.values()]",
           "the spread selection takes the smallest |G| of each metadata entry first instead of the largest",
           ("tests/test_codec.py", "tests/test_reports_final_rows.py")),
    Mutant("compare-cost-per-pair-is-calls", "src/datatailor/report/compare.py",
           '_num(r.per_pair(r.cost), ".6f")', '_num(r.per_pair(r.requests), ".6f")',
           "compare's $ per kept pair column shows calls per kept pair", ("tests/test_compare_report.py", "tests/test_reports_final_rows.py")),
    # the issue's own fixes, undone one line each (regression guards; caught since their tests were written)
    Mutant("runner-select-stays-before-filters", "src/datatailor/runner/rounds.py",
           "moving = trims_before_losses(stages, order, summaries)", "moving: list[int] = []",
           "a select standing before filters stays there in the top-up rounds (they never get past budget_pairs)",
           ("tests/test_refed.py",)),
    Mutant("runner-resume-replays-round-1", "src/datatailor/runner/rounds.py",
           "round = recorded_rounds(runner, stages, topper)", "round = 1",
           "a resumed run replays round 1, whose compaction drops the later rounds' failure rows (paid for again)",
           ("tests/test_refed.py",)),
    Mutant("refed-last-reference-full-quota", "src/datatailor/stages/refed/references.py",
           "return [self.config.pairs_per_reference] * full + ([rest] if rest else [])",
           "return [self.config.pairs_per_reference] * (full + bool(rest))",
           "the last reference a budget needs is asked for a full pairs_per_reference (budget 24 pays for 40)",
           ("tests/test_refed.py",)),
    Mutant("refed-report-reads-journals", "src/datatailor/report/refed.py",
           'return (read_journal(folder / "records.jsonl"),',
           'return ([r for row in read_journal(folder / "outputs.jsonl") for r in row["records"]],',
           "the REFED report reads a stage's journal, which holds the pairs of earlier rounds, not its final records",
           ("tests/test_refed.py", "tests/test_reports_final_rows.py")),
    Mutant("compare-stale-quality-file", "src/datatailor/report/compare.py",
           'rated = data["n"] + data.get("unrated", 0) + sum((data.get("failures") or {}).values())',
           'rated = len(records)', "compare shows a quality.json that rated an earlier data.jsonl",
           ("tests/test_compare_report.py", "tests/test_reports_final_rows.py")),
    # -- audit fixes (issue 16): CoachLM, evaluation, local calls --
    # The three CoachLM breaks the audit listed, then breaks of our own across CoachLM, evaluation (metrics, judging,
    # truncation counting), the bake-off's figures, the systematic-failure probe and local calls.
    Mutant("coach-copies-directive-instruction", "src/datatailor/stages/coach/revise.py",
           "if rouge_l_text(revision.response, self._directive) >= 0.5 or rouge_l_text(revision.instruction, self._directive) >= 0.5:",
           "if rouge_l_text(revision.response, self._directive) >= 0.5:",
           "CoachLM's cleanup accepts a revision whose instruction copies the coach's directive", ("tests/test_coach.py",)),
    Mutant("coach-prepare-cli-ascending", "src/datatailor/commands/coach.py",
           'direction: str = typer.Option("descending", "--direction"', 'direction: str = typer.Option("ascending", "--direction"',
           "`coach prepare` trains on the smallest revisions unless told otherwise", ("tests/test_coach.py",)),
    Mutant("coach-closeness-unrevised", "src/datatailor/report/coach.py",
           '"rouge_l": rouge_l_text(r.get("response") or "", md["revised_response"]),',
           '"rouge_l": rouge_l_text(original.get("response", ""), md["revised_response"]),',
           "the closeness-to-experts figure is computed on the unrevised pair", ("tests/test_coach.py",)),
    Mutant("coach-closeness-edit-unrevised", "src/datatailor/report/coach.py",
           '"edit_similarity": Levenshtein.normalized_similarity(final, expert),',
           '"edit_similarity": Levenshtein.normalized_similarity(before, expert),',
           "the pair's edit similarity to the expert's revision is computed on the unrevised pair", ("tests/test_coach.py",)),
    Mutant("coach-min-length-boundary", "src/datatailor/stages/coach/revise.py",
           "if ratio < cfg.min_length_ratio:", "if ratio <= cfg.min_length_ratio:",
           "a revision at exactly min_length_ratio of the original's length is refused as too short", ("tests/test_coach.py",)),
    Mutant("coach-unrated-not-revised", "src/datatailor/stages/coach/revise.py",
           "if isinstance(rating, (int, float)) and rating >= cfg.revise_below:",
           "if not isinstance(rating, (int, float)) or rating >= cfg.revise_below:",
           "the rating gate passes a pair whose rating did not parse without the coach seeing it", ("tests/test_coach.py",)),
    Mutant("quality-unparsable-drops", "src/datatailor/stages/quality.py",
           'unparsable: Literal["keep", "drop"] = Field(\n        "keep",', 'unparsable: Literal["keep", "drop"] = Field(\n        "drop",',
           "a rating that does not parse drops the pair (0 of 12 pairs out of the prompted CoachLM example)",
           ("tests/test_coach.py", "tests/test_eval_cli.py")),
    Mutant("coach-non-english-kept", "src/datatailor/stages/coach/revise.py",
           "remove_non_english: bool = Field(\n        True,", "remove_non_english: bool = Field(\n        False,",
           "CoachLM's cleanup no longer removes non-English characters from revisions of English pairs", ("tests/test_coach.py",)),
    Mutant("coach-heldout-our-distance", "src/datatailor/stages/coach/prepare.py",
           'row["Distance"] = p.stored_distance', 'row["Distance"] = p.distance',
           "heldout.jsonl writes our distance under CoachLM's own `Distance` key", ("tests/test_coach.py",)),
    Mutant("coach-high-quality-strict", "src/datatailor/scoring/quality.py",
           "high_quality_share=(sum(s >= HIGH_QUALITY for s in values) / n)", "high_quality_share=(sum(s > HIGH_QUALITY for s in values) / n)",
           "a pair rated exactly 4.5 is not counted as high quality", ("tests/test_coach.py", "tests/test_metrics.py")),
    Mutant("coach-preset-fixed-length", "src/datatailor/train/sft_config.py",
           '"max_length": "auto",', '"max_length": 512,',
           "the coachlm_coach preset cuts long revision targets at 512 tokens", ("tests/test_train.py",)),
    Mutant("train-auto-ignores-model-limit", "src/datatailor/train/sft_data.py",
           "max_length = max(1, min(longest, limit) if limit is not None else longest)", "max_length = max(1, longest)",
           "max_length auto goes past the length the model takes", ("tests/test_train.py",)),
    Mutant("eval-category-strict-only", "src/datatailor/evaluate/evaluation.py",
           "wtl_from_scores([scores[i.id] for i in mine if i.id in scores], plan.rule)",
           'wtl_from_scores([scores[i.id] for i in mine if i.id in scores], "strict")',
           "the per-category table ignores the chosen rule", ("tests/test_eval_cli.py",)),
    Mutant("eval-truncated-fails", "src/datatailor/evaluate/evaluation.py",
           '"max_tokens": plan.answer_max_tokens, "keep_truncated": True})', '"max_tokens": plan.answer_max_tokens, "keep_truncated": False})',
           "a candidate answer cut off by max_tokens is a failure (and five stop the run) instead of being judged",
           ("tests/test_eval_cli.py",)),
    Mutant("eval-truncated-judged-only", "src/datatailor/evaluate/evaluation.py",
           '    rows += [row["record"] for row in _failure_rows(run_dir) if isinstance(row.get("record"), dict)]\n', "",
           "a cut-off answer the judge could not score is not counted as cut off", ("tests/test_eval_cli.py",)),
    Mutant("eval-unjudgeable-not-lost", "src/datatailor/evaluate/evaluation.py",
           "metric_table(_with_losses(wtl_from_scores(scores.values(), rule), len(unanswered) + len(unjudgeable)))",
           "metric_table(_with_losses(wtl_from_scores(scores.values(), rule), len(unanswered)))",
           "an item the judge could not score drops out of N instead of counting as a loss", ("tests/test_eval_cli.py",)),
    Mutant("bakeoff-unjudged-tie", "src/datatailor/bakeoff/report.py",
           'if i in judged else "loss" for i in items]', 'if i in judged else "tie" for i in items]',
           "the bake-off's pooled ranking counts an unjudged item as a tie instead of a loss", ("tests/test_eval_cli.py",)),
    Mutant("bakeoff-tokens-per-pair", "src/datatailor/bakeoff/report.py",
           '"tokens_per_pair": tokens / pairs if pairs else None,',
           '"tokens_per_pair": usage.get("completion_tokens", 0) / pairs if pairs else None,',
           "the bake-off's tokens per pair leave out the prompt tokens", ("tests/test_eval_cli.py",)),
    Mutant("probe-truncation-window", "src/datatailor/runner/probe.py",
           'if self.seen >= self.window * (TRUNCATION_WINDOW if self.kind == "truncated" else 1):', "if self.seen >= self.window:",
           "five cut-off replies in a row stop a run, as if a cut reply were a broken template",
           ("tests/test_probe.py", "tests/test_eval_cli.py")),
    Mutant("llamacpp-all-threads", "src/datatailor/llm/llamacpp.py",
           "return max(1, usable // 2)", "return max(1, usable)",
           "llama.cpp runs as many threads as CPUs (4-8x slower on a busy 2-core machine)", ("tests/test_local_call_limits.py",)),
    # -- TeaMs-RL and the bake-off (issue 21) --
    # The circular import, the resumed training, keep: last, unjudged rewards, the running settings and observation,
    # the plan's counts and warning, the interval chart, and rules that must hold on every test set. Slow files are
    # narrowed to the tests meant to catch each mutant.
    Mutant("teams-import-cycle", "src/datatailor/stages/teams/stages.py",
           "from datatailor.stages.teams.options import PolicyOptions", "from datatailor.train.rl import PolicyOptions",
           "teams.train's config imports the trainer's module again (the circular import)", ("tests/test_imports.py",)),
    Mutant("teams-resume-torch-rng", "src/datatailor/train/rl.py",
           'torch.set_rng_state(state["rng"]["torch"])', "pass",
           "a resumed training samples actions from the seed's first random state again", ("tests/test_teams.py::test_a_resumed_training_ends_with_the_weights_log_and_calls_of_an_uninterrupted_one",)),
    Mutant("teams-resume-env-state", "src/datatailor/train/rl.py",
           '(env.venv if isinstance(env, VecNormalize) else env).restore(state["env"])', "pass",
           "a resumed training restarts the seed draws and episode counters", ("tests/test_teams.py::test_a_resumed_training_ends_with_the_weights_log_and_calls_of_an_uninterrupted_one",)),
    Mutant("teams-resume-force-reset", "src/datatailor/train/rl.py",
           "device=\"cpu\", force_reset=False)", "device=\"cpu\", force_reset=True)",
           "a resumed training resets its environments (new seed draws) instead of continuing them", ("tests/test_teams.py::test_a_resumed_training_ends_with_the_weights_log_and_calls_of_an_uninterrupted_one",)),
    Mutant("teams-keep-last-final-only", "src/datatailor/stages/teams/stages.py",
           "kept = await self._answer_last(record, episode, survivors, log, events)",
           "kept = await self._answer_last(record, episode, [s for s in survivors if s[0] == cfg.steps - 1], log, events)",
           "keep: last loses the seed when its final step is eliminated", ("tests/test_teams.py::test_keep_last_keeps_the_last_surviving_step_when_the_final_one_is_eliminated",)),
    Mutant("teams-keep-last-no-fallback", "src/datatailor/stages/teams/stages.py",
           "for step, instruction in reversed(survivors):", "for step, instruction in reversed(survivors[-1:]):",
           "keep: last gives up when the last surviving step's answer is unusable", ("tests/test_teams.py::test_keep_last_keeps_the_last_surviving_step_when_the_final_one_is_eliminated",)),
    Mutant("teams-reward-unjudged", "src/datatailor/stages/teams/stages.py",
           "if cfg.elimination else (None, None)", "if cfg.elimination else (1.0, None)",
           "generation records a reward of 1 for every step when no reviewer was asked",
           ("tests/test_teams.py::test_without_the_checks_no_reward_is_recorded",)),
    Mutant("teams-episodes-new-ids", "src/datatailor/stages/teams/stages.py",
           "return (episode,) if episode else ()", "return (episode,)",
           "episodes_per_seed changes the ids (and cache keys) of the first episode's pairs",
           ("tests/test_teams.py::test_episodes_per_seed_start_again_from_the_seed",)),
    Mutant("teams-breadth-bias-other-op", "src/datatailor/train/rl.py",
           "bias=bias_vector(breadth=settings.breadth_bias)", "bias=bias_vector(add_constraints=settings.breadth_bias)",
           "the training bias goes to add constraints instead of breadth", ("tests/test_teams.py::test_the_papers_training_settings_reach_the_running_trpo_and_environment",
            "tests/test_teams.py::test_the_observation_after_a_step_is_the_executed_operation")),
    Mutant("teams-gae-lambda", "src/datatailor/train/rl.py",
           "gae_lambda: float = 0.97", "gae_lambda: float = 0.95", "GAE λ 0.95 instead of the paper's 0.97", ("tests/test_teams.py::test_the_papers_training_settings_reach_the_running_trpo_and_environment",
            "tests/test_teams.py::test_the_observation_after_a_step_is_the_executed_operation")),
    Mutant("teams-max-kl-ignored", "src/datatailor/train/rl.py",
           "target_kl=settings.max_kl,", "target_kl=0.05,", "TRPO's KL bound 0.05 whatever max_kl says", ("tests/test_teams.py::test_the_papers_training_settings_reach_the_running_trpo_and_environment",
            "tests/test_teams.py::test_the_observation_after_a_step_is_the_executed_operation")),
    Mutant("teams-line-search-shrink", "src/datatailor/train/rl.py",
           "line_search_shrinking_factor=0.5,", "line_search_shrinking_factor=0.8,",
           "the line search shrinks by 0.8 instead of halving", ("tests/test_teams.py::test_the_papers_training_settings_reach_the_running_trpo_and_environment",
            "tests/test_teams.py::test_the_observation_after_a_step_is_the_executed_operation")),
    Mutant("teams-obs-clip", "src/datatailor/train/rl.py",
           "clip_obs=5.0", "clip_obs=10.0", "the observation filter clips at 10 instead of 5", ("tests/test_teams.py::test_the_papers_training_settings_reach_the_running_trpo_and_environment",
            "tests/test_teams.py::test_the_observation_after_a_step_is_the_executed_operation")),
    Mutant("teams-obs-wrong-op", "src/datatailor/stages/teams/env.py",
           "obs[i, e.last_op] = 1.0", "obs[i, (e.last_op + 1) % N_ACTIONS] = 1.0",
           "the observation after a step marks the next operation, not the one executed",
           ("tests/test_teams.py::test_the_observation_after_a_step_is_the_executed_operation",)),
    Mutant("teams-novelty-order", "src/datatailor/stages/teams/vec.py",
           "self.core.score_novelty(results)", "self.core.score_novelty(results[::-1])",
           "the novelty term is scored in another order than the environments'",
           ("tests/test_teams.py::test_novelty_is_scored_in_environment_order_whatever_review_comes_back_first",)),
    Mutant("teams-report-ops-per-pair", "src/datatailor/report/teams.py",
           'episodes = {(_ns(r)["seed_id"], _ns(r).get("episode", 0)): _ns(r)["ops"] for r in data}',
           'episodes = {r["id"]: _ns(r)["ops"] for r in data}',
           "the report counts an episode's operations once per kept pair",
           ("tests/test_teams.py::test_training_checkpoints_every_update_and_generation_uses_the_policy",)),
    Mutant("bakeoff-plan-no-training-calls", "src/datatailor/bakeoff/flow.py",
           "calls = cfg.updates * cfg.n_envs * EPISODE_LENGTH * 2", "calls = 0",
           "the plan leaves out TeaMs-RL's policy-training calls", ("tests/test_bakeoff.py",)),
    Mutant("bakeoff-plan-one-chain", "src/datatailor/bakeoff/flow.py",
           "rewrites = n.times(cfg.chains_per_seed * cfg.rounds)", "rewrites = n.times(cfg.rounds)",
           "the plan counts one Evol-Instruct chain per seed whatever chains_per_seed says", ("tests/test_bakeoff.py",)),
    Mutant("bakeoff-plan-one-episode", "src/datatailor/bakeoff/flow.py",
           "episodes = n.times(cfg.episodes_per_seed)", "episodes = n",
           "the plan counts one TeaMs-RL episode per seed whatever episodes_per_seed says", ("tests/test_bakeoff.py",)),
    Mutant("bakeoff-plan-no-warning", "src/datatailor/bakeoff/projection.py",
           "if flow.output.most is not None and flow.output.most < budget:", "if flow.output.most is not None and flow.output.most < 0:",
           "the plan does not warn when a method cannot make budget_pairs", ("tests/test_bakeoff.py",)),
    Mutant("bakeoff-plan-estimate-as-exact", "src/datatailor/bakeoff/flow.py",
           "answers = Count(rewrites.value * survive, rewrites.most, ESTIMATE if cfg.information_gain_check else AT_MOST)",
           "answers = Count(rewrites.value * survive, rewrites.most, EXACT if cfg.information_gain_check else AT_MOST)",
           "the plan labels Evol-Instruct's estimated answers as exact", ("tests/test_bakeoff.py",)),
    Mutant("bakeoff-interval-as-bars", "src/datatailor/bakeoff/report.py",
           'intervals=[[(conf[n]["low"], conf[n]["high"]) for n in names]])',
           'intervals=None) + bar_chart("interval", names, [("low", [conf[n]["low"] for n in names]), ("high", [conf[n]["high"] for n in names])])',
           "the report draws the interval's ends as bars of their own instead of an error bar", ("tests/test_bakeoff.py",)),
    Mutant("bakeoff-decontam-first-testset", "src/datatailor/bakeoff/run.py",
           '"testsets": [str(plan.eval_file(s)) for s in plan.splits]', '"testsets": [str(plan.eval_file(plan.splits[0]))]',
           "decontamination checks only the first test set's evaluation part", ("tests/test_bakeoff.py",)),
    Mutant("bakeoff-ranking-first-testset", "src/datatailor/bakeoff/report.py",
           "pooled[name] += outcomes", "pooled[name] = pooled[name] or outcomes",
           "the ranking's CRR and intervals use only the first test set's items", ("tests/test_bakeoff.py",)),
]


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    for rel in files.stdout.splitlines():
        src = REPO / rel
        if src.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def run_mutant(m: Mutant, snapshot: Path, pytest_args: list[str]) -> tuple[bool, float, str, str]:
    """(the suite failed, seconds, the first failing test or the summary line, pytest's output)"""
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        root = Path(tmp) / "main"
        shutil.copytree(snapshot, root)
        if (REPO.parent / "shared").is_dir():
            os.symlink(REPO.parent / "shared", Path(tmp) / "shared")
        path = root / m.file
        text = path.read_text(encoding="utf-8")
        if text.count(m.old) != 1:
            raise SystemExit(f"mutant {m.name}: expected exactly one occurrence of its line in {m.file}, found {text.count(m.old)}")
        path.write_text(text.replace(m.old, m.new), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=f"{root / 'src'}{os.pathsep}{root}", DATATAILOR_CACHE_DIR=str(Path(tmp) / "cache"))
        start = time.perf_counter()
        targets = pytest_args or list(m.tests)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not integration and not ray", *targets],
                              cwd=root, env=env, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
        detail = failed[0].removeprefix("FAILED ").split(" - ")[0] if failed else proc.stdout.strip().splitlines()[-1]
        return proc.returncode != 0, seconds, detail, proc.stdout + proc.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run only mutants whose name contains this (several: comma-separated)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. a test file to run instead of the suite)")
    args = parser.parse_args()
    wanted = [w for w in (args.only or "").split(",") if w]
    chosen = [m for m in MUTANTS if not wanted or any(w in m.name for w in wanted)]
    if args.list:
        for m in chosen:
            print(f"{m.name:28s} {m.file}: {m.what}")
        return 0
    # One snapshot of the working tree at the start, so edits made while this runs do not leak into it.
    snapshot_dir = tempfile.TemporaryDirectory(prefix="mutants-snapshot-")
    snapshot = Path(snapshot_dir.name) / "main"
    copy_repo(snapshot)
    baseline = Mutant("baseline", "pyproject.toml", "[project]", "[project]", "no change: the suite must pass first")
    # the baseline runs what the mutants will run: the named test files when every chosen mutant names some
    named = list(dict.fromkeys(t for m in chosen for t in m.tests)) if all(m.tests for m in chosen) else []
    baseline = Mutant(baseline.name, baseline.file, baseline.old, baseline.new, baseline.what, tuple(named))
    failed, seconds, detail, output = run_mutant(baseline, snapshot, args.pytest_args)
    if failed:
        print(f"the unchanged suite fails ({detail}): fix it before checking mutants", file=sys.stderr)
        print(output[-4000:], file=sys.stderr)
        return 2
    print(f"unchanged suite: passes in {seconds:.1f} s\n")
    survived = 0
    print(f"{'mutant':28s} {'result':9s} {'seconds':>7s}  first failing test")
    for m in chosen:
        caught, seconds, detail, _ = run_mutant(m, snapshot, args.pytest_args)
        survived += not caught
        print(f"{m.name:28s} {'caught' if caught else 'SURVIVED':9s} {seconds:7.1f}  {detail}", flush=True)
    print(f"\n{len(chosen) - survived} of {len(chosen)} mutants caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
