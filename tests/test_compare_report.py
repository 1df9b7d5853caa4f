"""`datatailor compare` renders one self-contained HTML page with every figure present."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from datatailor.cli import main
from datatailor.recipe import parse_recipe
from datatailor.report.compare import FIGURE_IDS, method_of
from datatailor.runner import run_recipe_sync

VICUNA_Q1 = "How can I improve my time management skills?"


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, dict[str, object]] = {}
        self.tags: list[str] = []
        self.external: list[str] = []
        self._figure: str | None = None
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        for key in ("src", "href"):
            if a.get(key):
                self.external.append(str(a[key]))
        if tag == "figure":
            self._figure = str(a.get("id"))
            self.figures[self._figure] = {"svg": 0, "label": None, "caption": False}
        elif tag == "svg" and self._figure:
            self.figures[self._figure]["svg"] = int(self.figures[self._figure]["svg"]) + 1  # type: ignore[call-overload]
            self.figures[self._figure]["label"] = a.get("aria-label")
        elif tag == "figcaption" and self._figure:
            self.figures[self._figure]["caption"] = True
        elif tag == "td":
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = None
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells[-1] += data


def _make_run(tmp_path: Path, name: str, instructions: list[str], rate: bool, price: float) -> Path:
    seeds = tmp_path / f"{name}-seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": i}) + "\n" for i in instructions), encoding="utf-8")
    stages: list[dict[str, object]] = [{"type": "respond", "role": "strong"}]
    models: dict[str, object] = {
        "strong": {"backend": "scripted", "model": "strong", "price_per_mtok_out": price,
                   "rules": [{"match": ".*", "reply": "A short helpful answer with a few words."}]},
    }
    if rate:
        stages.append({"type": "quality.rate", "role": "judge"})
        models["judge"] = {"backend": "scripted", "model": "rater",
                           "rules": [{"match": "time management", "reply": "Score: 5"}, {"match": ".*", "reply": "Score: 3"}]}
    recipe = parse_recipe({"name": name, "models": models, "input": str(seeds), "stages": stages}, name, tmp_path)
    out = tmp_path / name
    assert run_recipe_sync(recipe, out, show_progress=False).status == "complete"
    return out


def _models_file(tmp_path: Path) -> Path:
    models = {
        "candidate": {"backend": "scripted", "model": "tuned", "rules": [{"match": ".*", "reply": "CAND"}]},
        "judge": {"backend": "scripted", "model": "judge", "handler": "tests.support:judge_prefers_cand"},
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(models), encoding="utf-8")
    return path


@pytest.fixture
def report(tmp_path: Path) -> tuple[Path, _Page]:
    codec = _make_run(tmp_path, "codec", [VICUNA_Q1, "Write a haiku about rain.", "List three prime numbers.",
                                          "Summarise the plot of a detective novel."], rate=True, price=2.0)
    base = _make_run(tmp_path, "self", ["Name a colour.", "Translate 'hello' into French.", "Give a synonym of big."],
                     rate=False, price=1.0)
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"instruction": f"q{i}", "reference": "REF"}) + "\n" for i in range(3)), encoding="utf-8")
    assert main(["eval", "--testset", str(tiny), "--models", str(_models_file(tmp_path)), "--reference", "stored",
                 "--out", str(codec / "eval-tiny"), "--no-progress"]) == 0
    out = tmp_path / "report.html"
    assert main(["compare", str(codec), str(base), "--out", str(out), "--no-embeddings"]) == 0
    page = _Page()
    page.feed(out.read_text(encoding="utf-8"))
    return out, page


def test_every_figure_is_present_with_alt_text(report: tuple[Path, _Page]) -> None:
    _, page = report
    assert set(FIGURE_IDS) <= set(page.figures)
    for fig_id in FIGURE_IDS:
        fig = page.figures[fig_id]
        assert fig["svg"] == 1, fig_id
        assert fig["label"], f"{fig_id} has no aria-label"
        assert fig["caption"], f"{fig_id} has no caption"


def test_report_is_self_contained(report: tuple[Path, _Page]) -> None:
    out, page = report
    assert page.external == []
    assert not {"script", "link", "img", "iframe"} & set(page.tags)
    assert "@import" not in out.read_text(encoding="utf-8")


def test_report_holds_the_runs_numbers(report: tuple[Path, _Page]) -> None:
    out, page = report
    text = out.read_text(encoding="utf-8")
    cells = page.cells
    # overview: the codec run has 4 kept pairs, the baseline 3
    i = cells.index("codec")
    assert cells[i + 3] == "4"
    j = cells.index("self")
    assert cells[j + 3] == "3"
    # quality: 1 of 4 rated 5 (time management), 3 rated 3 → mean 3.5, high-quality share 25 %
    k = cells.index("codec", i + 1)
    assert cells[k + 1 : k + 4] == ["4", "3.50", "25.0"]
    # contamination: the Vicuna question inside the codec run is flagged
    assert "vicuna80" in text
    contamination_rows = [n for n, c in enumerate(cells) if c == "codec"]
    assert any(cells[n + 1] == "1" and cells[n + 2] == "25.00" for n in contamination_rows)
    # evaluation: the candidate wins every item in both orders → W/T/L 3/0/0, CRR 100
    assert "codec · tiny" in cells
    e = cells.index("codec · tiny")
    assert cells[e + 4 : e + 7] == ["3/0/0", "3", "100.00"]
    # calls and $ per kept pair: 4 answers + 4 ratings for 4 pairs; 8 words per answer at $2 per million
    assert cells[i + 8 : i + 10] == ["2.00", "0.000016"]


def test_missing_run_dir_exits_2(tmp_path: Path) -> None:
    assert main(["compare", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html"), "--no-embeddings"]) == 2
    (tmp_path / "plain").mkdir()
    assert main(["compare", str(tmp_path / "plain"), "--out", str(tmp_path / "r.html"), "--no-embeddings"]) == 2
    assert not (tmp_path / "r.html").exists()


def test_method_comes_from_the_manifest_not_the_stage_names() -> None:
    stage = lambda t, m: {"type": t, "method": m}  # noqa: E731
    assert method_of([stage("codec.encode", "codec"), stage("respond", None), stage("codec.contrastive", "codec")], None) == "CodecLM"
    assert method_of([stage("self_instruct", "self_instruct"), stage("respond", None)], "x") == "Self-Instruct"
    # a stage named like a method but declaring none is not guessed from its name
    assert method_of([stage("codec_like.thing", None), stage("dedup", None)], "mine") == "custom (codec_like.thing, dedup)"
    assert method_of([stage("evol.evolve", "evol"), stage("codec.select", "codec")], None) == "Evol-Instruct + CodecLM"
    assert method_of([], "recipe-name") == "recipe-name"


def test_a_run_that_kept_nothing_is_shown_not_fatal(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": "Say something."}) + "\n", encoding="utf-8")
    recipe = parse_recipe({"name": "empty", "input": str(seeds), "stages": [{"type": "respond", "role": "strong"}],
                           "models": {"strong": {"backend": "scripted", "model": "mute", "rules": [{"match": ".*", "reply": " "}]}}},
                          "empty", tmp_path)
    assert run_recipe_sync(recipe, tmp_path / "empty", show_progress=False).status == "complete"
    out = tmp_path / "r.html"
    assert main(["compare", str(tmp_path / "empty"), "--out", str(out), "--no-embeddings"]) == 0
    page = _Page()
    page.feed(out.read_text(encoding="utf-8"))
    assert set(FIGURE_IDS) <= set(page.figures)
    i = page.cells.index("empty")
    assert page.cells[i + 3] == "0" and page.cells[i + 8] == "n/a"  # 0 pairs: no per-pair figures
    assert "No kept pairs in: empty" in out.read_text(encoding="utf-8")
