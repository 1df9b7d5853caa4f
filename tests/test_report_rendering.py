"""Every HTML report the project writes renders in a real (headless) Chromium: no console or page errors,
every `<figure>` is displayed with a non-zero size, and a full-page screenshot is saved.

The browser is driven with Playwright (`playwright` from PyPI) against the system Chromium; Playwright's own
browser download is never used. Without a Chromium binary the tests skip, unless `CI` is set: then they fail.
Screenshots go to pytest's tmp_path and, when `DATATAILOR_SCREENSHOT_DIR` is set, also into that folder.

To cover a new report, write a builder `(tmp_path) -> (html_path, figure_ids_it_must_have)` and add one line
to REPORTS.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from datatailor.cli import main
from datatailor.records import Record
from datatailor.report import codec as codec_report
from datatailor.stages.codec import CodecData, ContrastiveResult
from datatailor.report.compare import FIGURE_IDS as COMPARE_FIGURE_IDS
from tests.test_compare_report import VICUNA_Q1, _make_run, _models_file

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 900}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ReportBuilder = Callable[[Path], tuple[Path, Sequence[str]]]


# --------------------------------------------------------------------------------------------- report builders


def build_compare_report(tmp_path: Path) -> tuple[Path, Sequence[str]]:
    """`datatailor compare` over a rated CodecLM-like run (with an eval) and a plain baseline run."""
    codec = _make_run(tmp_path, "codec", [VICUNA_Q1, "Write a haiku about rain.", "List three prime numbers.",
                                          "Summarise the plot of a detective novel."], rate=True, price=2.0)
    base = _make_run(tmp_path, "self", ["Name a colour.", "Translate 'hello' into French.", "Give a synonym of big."],
                     rate=False, price=1.0)
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"instruction": f"q{i}", "reference": "REF"}) + "\n" for i in range(3)),
                    encoding="utf-8")
    assert main(["eval", "--testset", str(tiny), "--models", str(_models_file(tmp_path)), "--reference", "stored",
                 "--out", str(codec / "eval-tiny"), "--no-progress"]) == 0
    out = tmp_path / "compare.html"
    assert main(["compare", str(codec), str(base), "--out", str(out), "--no-embeddings"]) == 0
    return out, COMPARE_FIGURE_IDS


def _codec_record(n: int, use_case: str, skills: list[str], gaps: list[float], kept: str | None,
                  below: bool = False) -> Record:
    # Every other comparison flips with the answer order, so the report also shows its consistency warning.
    history = [{"iteration": i + 1, "instruction": f"instruction {n}", "G": g,
                "scores": {"position_consistent": (n + i) % 2 == 0}} for i, g in enumerate(gaps)]
    result = ContrastiveResult(kept=kept, below_threshold=below, iteration=len(history), G=gaps[-1] if gaps else None,
                               threshold=1.0, history=history)
    record = Record(id=f"r{n}", instruction=f"instruction {n}", response="answer" if kept else None)
    record.metadata = CodecData(use_case=use_case, skills=skills, contrastive=result).stored(record)
    return record


def build_codec_report(tmp_path: Path) -> tuple[Path, Sequence[str]]:
    """The CodecLM report, from a few hand-made kept records, failure rows and pool entries."""
    kept = [
        _codec_record(1, "coding", ["python", "debugging"], [3.5], "strong"),
        _codec_record(2, "writing", ["poetry"], [0.5, -2.0], "target"),
        _codec_record(3, "coding", ["python"], [0.0, 4.0], "strong"),
        _codec_record(4, "math", ["arithmetic"], [0.5, 0.5], "strong", below=True),
    ]
    dropped: list[dict[str, Any]] = [
        {"kind": "below_threshold", "record": _codec_record(5, "writing", ["essay"], [0.5, -0.5], None).model_dump()},
        {"kind": "error", "record": _codec_record(6, "trivia", ["history"], [], None).model_dump()},
    ]
    pool = [
        {"use_case": "coding", "skills": ["python", "debugging"], "origin": "seed", "seeds": ["s1", "s2"]},
        {"use_case": "writing", "skills": ["poetry", "essay"], "origin": "seed", "seeds": ["s3"]},
        {"use_case": "trivia", "skills": ["history"], "origin": "given"},
        {"use_case": "math", "skills": ["arithmetic"], "origin": "generated"},
    ]
    out_dir = tmp_path / "codec-run"
    out_dir.mkdir()
    codec_report.write_codec_report(out_dir, kept=kept, dropped=dropped, pool=pool, threshold=1.0,
                                    max_iterations=2, budget_pairs=5)
    return out_dir / f"{codec_report.REPORT_STEM}.html", codec_report.FIGURE_IDS


def build_refed_report(tmp_path: Path) -> tuple[Path, Sequence[str]]:
    """A REFED run on the scripted teacher of tests/test_refed.py, with its judge filter; the run writes the report."""
    from datatailor.report import refed as refed_report
    from tests.test_refed import FULL, run

    judge = {"type": "judge.pairwise", "role": "judge", "a": "response", "b": "metadata.refed.draft", "rule": "strict"}
    run(tmp_path, [*FULL[:-1], judge, FULL[-1]], budget_pairs=8)
    return tmp_path / "out" / "reports" / "refed_report.html", refed_report.FIGURE_IDS


def build_coach_report(tmp_path: Path) -> tuple[Path, Sequence[str]]:
    """A CoachLM run on the scripted coach of tests/test_coach.py (every kept-original reason), rated before and after."""
    from datatailor.report import coach as coach_report
    from tests.test_coach import ROWS, revise

    judge = {"backend": "scripted", "model": "rater", "handler": "tests.test_coach:rater"}
    revise(tmp_path, [{"type": "quality.rate", "role": "judge"}, {"type": "coach.revise"},
                      {"type": "quality.rate", "name": "after", "role": "judge", "key": "quality_after"}], ROWS, judge=judge)
    return tmp_path / "out" / "reports" / "coachlm_report.html", coach_report.FIGURE_IDS


def build_teams_report(tmp_path: Path) -> tuple[Path, Sequence[str]]:
    """A TeaMs-RL run on the scripted world of tests/test_teams.py: 2 TRPO updates, then generation."""
    pytest.importorskip("sb3_contrib")
    from datatailor.recipe import parse_recipe
    from datatailor.report import teams as teams_report
    from datatailor.runner import run_recipe_sync
    from tests.test_teams import TRAIN, recipe

    stages = [{**TRAIN, "updates": 2}, {"type": "teams.generate", "schedule": "official", "keep": "all", "elimination": False}]
    run_recipe_sync(parse_recipe(recipe(tmp_path, stages), "t", tmp_path), tmp_path / "out", show_progress=False)
    return tmp_path / "out" / "reports" / "teams_rl_report.html", teams_report.FIGURE_IDS


def build_bakeoff_report(tmp_path: Path) -> tuple[Path, Sequence[str]]:
    """The scripted bake-off of tests/test_bakeoff.py (three methods and the untuned row, two test sets)."""
    from datatailor.bakeoff.config import load_bakeoff
    from datatailor.bakeoff.run import run_bakeoff
    from tests.test_bakeoff import world

    run_bakeoff(load_bakeoff(world(tmp_path)), tmp_path / "out", log_stream=None)
    return tmp_path / "out" / "bakeoff_report.html", ("fig-crr", "fig-quality")


# One line per HTML report the project writes.
REPORTS = [
    pytest.param(build_compare_report, id="compare"),
    pytest.param(build_codec_report, id="codec"),
    pytest.param(build_refed_report, id="refed"),
    pytest.param(build_coach_report, id="coachlm"),
    pytest.param(build_teams_report, id="teams_rl"),
    pytest.param(build_bakeoff_report, id="bakeoff"),
]


# --------------------------------------------------------------------------------------------- the browser


def _missing(reason: str) -> None:
    """Skip, or fail under CI, where the browser test must run."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the browser test may not skip "
                    "(install it with: apt-get install -y chromium, and pip install -e '.[test]')", pytrace=False)
    pytest.skip(reason)


def find_chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture
def chromium() -> str:
    """The Chromium binary; skips (or fails under CI) when there is none or Playwright is missing."""
    found = find_chromium()
    if found is None:
        _missing(f"no Chromium binary found (looked for {', '.join(CHROMIUM_CANDIDATES)})")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the playwright package is not installed")
    assert found is not None
    return found


@contextmanager
def open_page(chromium: str, profile: Path) -> Iterator[tuple[Any, list[str]]]:
    """A page of a fresh headless Chromium, and the list its console/page/request errors are appended to.

    Started after the report is built: Playwright's sync API keeps an event loop running, and the runner's
    asyncio.run() may not be called inside one.
    """
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT,
            offline=True, timeout=60_000,
        )
        try:
            context.set_default_timeout(30_000)
            page = context.new_page()
            page.on("console", lambda msg: errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url} ({req.failure})"))
            yield page, errors
        finally:
            context.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("build", REPORTS)
def test_report_renders_in_chromium(build: ReportBuilder, chromium: str, tmp_path: Path,
                                    request: pytest.FixtureRequest) -> None:
    html_path, expected_ids = build(tmp_path)
    assert html_path.is_file()
    name = request.node.callspec.id

    profile = tmp_path / "chromium-profile"  # a fresh user-data-dir for every report
    with open_page(chromium, profile) as (page, errors):
        page.goto(html_path.as_uri(), wait_until="load")
        _save_screenshot(page, tmp_path / f"{name}.png")

        figures = page.locator("figure")
        count = figures.count()
        assert count > 0, f"{name}: the page has no <figure>"
        ids = [figures.nth(i).get_attribute("id") for i in range(count)]
        assert set(expected_ids) <= set(ids), f"{name}: missing figures {sorted(set(expected_ids) - set(ids))}"
        for i, fig_id in enumerate(ids):
            fig = figures.nth(i)
            label = f"{name}: figure {fig_id or i}"
            assert fig.is_visible(), f"{label} is not displayed"
            style = fig.evaluate("e => { const s = getComputedStyle(e); return [s.display, s.visibility]; }")
            assert style[0] != "none" and style[1] == "visible", f"{label} is hidden: {style}"
            box = fig.bounding_box()
            assert box is not None and box["width"] > 0 and box["height"] > 0, f"{label} has an empty box: {box}"
            chart = fig.locator(":scope > svg, :scope > table").first
            chart_box = chart.bounding_box()
            assert chart_box is not None and chart_box["width"] > 0 and chart_box["height"] > 0, (
                f"{label}: its chart has an empty box: {chart_box}")
    assert errors == [], f"{name}: the browser reported errors:\n" + "\n".join(errors)


def _save_screenshot(page: Any, shot: Path) -> None:
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(PNG_MAGIC), f"{shot} is not a PNG"
    if os.environ.get("DATATAILOR_SCREENSHOT_DIR"):
        target = Path(os.environ["DATATAILOR_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target / shot.name)


@pytest.mark.timeout(180)
def test_the_bakeoff_chart_draws_each_interval_as_an_error_bar_on_its_bar(chromium: str, tmp_path: Path) -> None:
    """As laid out by the browser: one bar per method, and on each a whisker centred on the bar whose span holds the
    bar's top (the estimate lies within its interval); the wide interval of a coin-flip method is visibly long."""
    from datatailor.bakeoff.config import load_bakeoff
    from datatailor.bakeoff.run import run_bakeoff
    from tests.test_bakeoff import world

    methods = [{"name": "good", "recipe": "respond.yaml"}, {"name": "half", "recipe": "respond.yaml"}, {"name": "base", "untuned": True}]
    report = run_bakeoff(load_bakeoff(world(tmp_path, methods=methods)), tmp_path / "out", log_stream=None)
    names = report["ranking"]["ranking"]
    with open_page(chromium, tmp_path / "chromium-profile") as (page, errors):
        page.goto((tmp_path / "out" / "bakeoff_report.html").as_uri(), wait_until="load")
        _save_screenshot(page, tmp_path / "bakeoff-error-bars.png")
        bars = page.locator("#fig-crr svg rect:has(title)")
        whiskers = page.locator("#fig-crr svg g.interval")
        assert bars.count() == whiskers.count() == len(names)
        for i, name in enumerate(names):
            bar, whisker = bars.nth(i).bounding_box(), whiskers.nth(i).bounding_box()
            assert bar is not None and whisker is not None, name
            centre = whisker["x"] + whisker["width"] / 2
            assert bar["x"] < centre < bar["x"] + bar["width"], name
            assert whisker["y"] - 1.5 <= bar["y"] <= whisker["y"] + whisker["height"] + 1.5, name
        half = whiskers.nth(names.index("half")).bounding_box()
        assert half is not None and half["height"] > 20
    assert errors == [], "\n".join(errors)
