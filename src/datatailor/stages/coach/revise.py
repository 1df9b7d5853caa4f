"""`coach.revise`: a coach rewrites each pair; a revision that does not hold up never replaces the pair."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from datatailor.errors import UserError
from datatailor.io import read_records
from datatailor.records import Record, read_field
from datatailor.scoring.text import rouge_l_text
from datatailor.stages.base import RECORD_VARIABLES, MapStage, StageConfig, record_variables, register
from datatailor.stages.coach.data import CoachData, KeptReason
from datatailor.stages.coach.format import Pair, directive, parse_pair, serialize_pair
from datatailor.stages.coach.prepare import SHIPPED, expert_pair, revision_size, shipped_expert_file
from datatailor.stages.contract import Contract


class ReviseConfig(StageConfig):
    type: Literal["coach.revise"] = "coach.revise"
    role: str = Field("coach", description="The coach: a model trained on expert revisions, or any instruct model (prompted).")
    mode: Literal["trained", "prompted"] = Field(
        "trained",
        description=(
            "trained: the coach format exactly as `datatailor train` saw it (the directive and the serialized pair through "
            "`template`); prompted: the directive, `shots` expert revisions as examples, then the pair (no training)."
        ),
    )
    template: str = Field("respond.j2", description="trained mode: the answer template training used (train's --template).")
    prompted_template: str = "coach/prompted.j2"
    shots_file: str = Field(
        SHIPPED, description="prompted mode: expert before/after pairs to take examples from (`coachlm`: the shipped set; or a path)."
    )
    shots: int = Field(3, ge=0, description="prompted mode: expert revisions shown as examples (drawn with the seed).")
    temperature: float | None = Field(0.0, description="0: greedy decoding, as the paper's coach.")
    max_tokens: int | None = None
    min_length_ratio: float = Field(
        0.5, ge=0, description="A revised response shorter than this share of the original's is degenerate (original kept)."
    )
    max_length_ratio: float = Field(
        6.0, gt=0, description="A revised response longer than this multiple of the original's is degenerate (the paper's README: drop excessively long outputs)."
    )
    revise_below: float | None = Field(
        None, ge=0, le=5,
        description="Rating gate: revise only pairs whose 0-5 rating (`rating_field`, from a quality.rate stage) is below this; others pass unchanged.",
    )
    rating_field: str = Field("metadata.quality", description="Where the gate reads the rating.")

    @model_validator(mode="after")
    def _ratios(self) -> "ReviseConfig":
        if self.min_length_ratio >= self.max_length_ratio:
            raise ValueError("min_length_ratio must be below max_length_ratio")
        return self


def changed_fields(before: Pair, after: Pair) -> list[str]:
    return [name for name, a in before.fields().items() if a.strip() != after.fields()[name].strip()]


@register("coach.revise")
class Revise(MapStage[ReviseConfig]):
    """CoachLM (Liu et al., ICDE 2024, arXiv 2311.13246): revise each pair with a coach instead of dropping weak ones.

    The pair is written in the coach format, the coach answers (greedy by default), and its reply is parsed back into
    instruction / input / response with rule-based cleanup. A reply that does not parse, has an empty field, is far
    shorter or longer than the original, copies the prompt, was cut off by max_tokens, or changes nothing never
    replaces the pair: the original is kept, with the reason in `metadata.coach`. Nothing is dropped. With
    `revise_below`, only pairs rated below it are revised (the industrial use the paper describes); re-rate after.
    """

    Config = ReviseConfig
    method = "coachlm"
    needs = ("instruction", "response")
    provides = ("coach.revised",)
    templates = {"template": RECORD_VARIABLES, "prompted_template": ("directive", "examples", "pair")}

    @classmethod
    def contract(cls, config: Any) -> Contract:
        needs = list(cls.needs)
        if config is not None and config.revise_below is not None:
            needs.append(config.rating_field)
        return Contract.of(needs, cls.provides)

    def __init__(self, config: ReviseConfig, ctx: Any):
        super().__init__(config, ctx)
        self._directive = directive()
        self._examples: list[dict[str, str]] | None = None

    def examples(self) -> list[dict[str, str]]:
        """The prompted coach's examples: `shots` expert revisions drawn with the seed."""
        if self._examples is None:
            path = shipped_expert_file() if self.config.shots_file == SHIPPED else self.ctx.base_dir / self.config.shots_file
            if not path.exists():
                raise UserError(f"coach.revise: shots_file not found: {path}")
            pairs = [expert_pair(r) for r in read_records(path)]
            picked = self.ctx.rng("shots").sample(pairs, min(self.config.shots, len(pairs)))
            self._examples = [{"before": serialize_pair(**p.before.fields()), "after": serialize_pair(**p.after.fields())} for p in picked]
        return self._examples

    async def _ask(self, record: Record, original: Pair) -> Any:
        cfg = self.config
        serialized = serialize_pair(**original.fields())
        options = {"seed_key": (self.name, record.id), "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
        if cfg.mode == "prompted":
            variables = {"directive": self._directive, "examples": self.examples(), "pair": serialized}
            return await self.call(cfg.role, "prompted_template", variables, **options)
        # Exactly what `datatailor train` rendered for a coach training example: directive as instruction, pair as input.
        request = Record(id=record.id, instruction=self._directive, input=serialized)
        return await self.call(cfg.role, "template", record_variables(request), **options)

    def _check(self, original: Pair, gen: Any) -> tuple[Pair | None, KeptReason | None, str]:
        """The revision, or why the original is kept."""
        cfg = self.config
        try:
            revision = parse_pair(gen.text)
        except ValueError as exc:
            return None, "unparsable", str(exc)
        if gen.truncated:
            return revision, "truncated", "the coach's reply was cut off by max_tokens"
        if not revision.instruction.strip() or not revision.response.strip():
            return revision, "empty_field", "the revision has an empty instruction or response"
        if rouge_l_text(revision.response, self._directive) >= 0.5 or rouge_l_text(revision.instruction, self._directive) >= 0.5:
            return revision, "copies_prompt", "the revision repeats the revision directive"
        ratio = len(revision.response) / max(1, len(original.response))
        if ratio < cfg.min_length_ratio:
            return revision, "too_short", f"the revised response is {ratio:.2f}× the original's length (< {cfg.min_length_ratio})"
        if ratio > cfg.max_length_ratio:
            return revision, "too_long", f"the revised response is {ratio:.1f}× the original's length (> {cfg.max_length_ratio})"
        if not changed_fields(original, revision):
            return revision, "unchanged", "the coach changed nothing"
        return revision, None, "revised"

    async def process(self, record: Record) -> list[Record]:
        cfg = self.config
        original = Pair(record.instruction, record.input, record.response or "")
        if cfg.revise_below is not None:
            rating = read_field(record, cfg.rating_field)
            rating = rating.get("score") if isinstance(rating, dict) else rating
            if isinstance(rating, (int, float)) and rating >= cfg.revise_below:
                data = CoachData(mode=cfg.mode, original=original.fields(), kept_original="rated_high",
                                 reason=f"rated {rating:g} ≥ revise_below {cfg.revise_below:g}: not revised")
                return [record.model_copy(update={"metadata": data.stored(record)}, deep=True)]
        gen = await self._ask(record, original)
        revision, kept, reason = self._check(original, gen)
        final = original if kept else revision
        assert final is not None
        data = CoachData(
            mode=cfg.mode, original=original.fields(), revision=revision.fields() if revision else None,
            revised=kept is None, kept_original=kept, reason=reason,
            edit_distance=revision_size(original, final), changed=changed_fields(original, final), raw_output=gen.text,
        )
        event = gen.event(self.name, decision="revised" if kept is None else f"kept_original:{kept}", reason=reason,
                          edit_distance=data.edit_distance, changed=data.changed)
        return [record.with_event(event, **final.fields(), metadata=data.stored(record))]

