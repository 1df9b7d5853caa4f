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
from datatailor.stages.coach.format import Pair, directive, is_english, parse_pair, remove_foreign, serialize_pair
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
    remove_non_english: bool = Field(
        True,
        description=(
            "CoachLM's cleanup of its coach's outputs (its README: remove non-English characters): in the revision of an "
            "English pair, letters of scripts other than Latin and Greek, other scripts' digits and CJK punctuation are "
            "removed (counted in metadata.coach.non_english_removed). A pair that already holds such characters is left as revised."
        ),
    )

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
    instruction / input / response with rule-based cleanup (for an English pair also the removal of other scripts'
    characters, as CoachLM's README recommends; `remove_non_english`). A reply that does not parse, has an empty field, is far
    shorter or longer than the original, copies the prompt, was cut off by max_tokens, or changes nothing never
    replaces the pair: the original is kept, with the reason in `metadata.coach`. Nothing is dropped. With
    `revise_below`, only pairs rated below it are revised (the industrial use the paper describes); re-rate after. A
    pair without a rating (the judge's did not parse; `quality.rate` keeps it unrated) is revised: nothing says it is good.
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

    def _clean(self, original: Pair, revision: Pair) -> tuple[Pair, int]:
        """The revision after CoachLM's removal of non-English characters (English pairs only), and how many went."""
        if not self.config.remove_non_english or not is_english(*original.fields().values()):
            return revision, 0
        cleaned = {name: remove_foreign(text) for name, text in revision.fields().items()}
        return Pair(**{name: text for name, (text, _) in cleaned.items()}), sum(n for _, n in cleaned.values())

    def _check(self, original: Pair, revision: Pair, gen: Any) -> tuple[KeptReason | None, str]:
        """Why the original is kept instead of the (cleaned) revision, or (None, "revised")."""
        cfg = self.config
        if gen.truncated:
            return "truncated", "the coach's reply was cut off by max_tokens"
        if not revision.instruction.strip() or not revision.response.strip():
            return "empty_field", "the revision has an empty instruction or response"
        if rouge_l_text(revision.response, self._directive) >= 0.5 or rouge_l_text(revision.instruction, self._directive) >= 0.5:
            return "copies_prompt", "the revision repeats the revision directive"
        ratio = len(revision.response) / max(1, len(original.response))
        if ratio < cfg.min_length_ratio:
            return "too_short", f"the revised response is {ratio:.2f}× the original's length (< {cfg.min_length_ratio})"
        if ratio > cfg.max_length_ratio:
            return "too_long", f"the revised response is {ratio:.1f}× the original's length (> {cfg.max_length_ratio})"
        if not changed_fields(original, revision):
            return "unchanged", "the coach changed nothing"
        return None, "revised"

    async def process(self, record: Record) -> list[Record]:
        cfg = self.config
        original = Pair(record.instruction, record.input, record.response or "")
        unrated = False
        if cfg.revise_below is not None:
            rating = read_field(record, cfg.rating_field)
            rating = rating.get("score") if isinstance(rating, dict) else rating
            if isinstance(rating, (int, float)) and rating >= cfg.revise_below:
                data = CoachData(mode=cfg.mode, original=original.fields(), kept_original="rated_high",
                                 reason=f"rated {rating:g} ≥ revise_below {cfg.revise_below:g}: not revised")
                return [record.model_copy(update={"metadata": data.stored(record)}, deep=True)]
            # No rating (the judge's did not parse): nothing says the pair is good, so the coach sees it.
            unrated = not isinstance(rating, (int, float))
        gen = await self._ask(record, original)
        removed = 0
        revision: Pair | None = None
        kept: KeptReason | None
        try:
            parsed = parse_pair(gen.text)
        except ValueError as exc:
            kept, reason = "unparsable", str(exc)
        else:
            revision, removed = self._clean(original, parsed)
            kept, reason = self._check(original, revision, gen)
        final = original if kept or revision is None else revision
        data = CoachData(
            mode=cfg.mode, original=original.fields(), revision=revision.fields() if revision else None,
            revised=kept is None, kept_original=kept, reason=reason,
            edit_distance=revision_size(original, final), changed=changed_fields(original, final), raw_output=gen.text,
            unrated=unrated, non_english_removed=removed,
        )
        event = gen.event(self.name, decision="revised" if kept is None else f"kept_original:{kept}", reason=reason,
                          edit_distance=data.edit_distance, changed=data.changed)
        return [record.with_event(event, **final.fields(), metadata=data.stored(record))]

