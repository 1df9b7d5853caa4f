"""`datatailor view` in a real (headless) Chromium driven by Playwright: every page loads without console errors,
search and filters change the rows, a record's diff is visible, a flag persists across a reload. Screenshots of
each page are saved: in DATATAILOR_SCREENSHOT_DIR when set, else in the test's tmp folder (the path is printed).

The server is the real command (`datatailor view ... --port 0`) over the runs of tests/test_viewer.py. Without a
Chromium binary or Playwright the tests skip, unless CI is set: then they fail (as tests/test_report_rendering.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli_env
from tests.support import read_jsonl
from tests.test_report_rendering import CHROMIUM_ARGS, PNG_MAGIC, chromium  # noqa: F401  (the fixture)
from tests.test_viewer import build_runs

pytest.importorskip("starlette")

VIEWPORT = {"width": 1280, "height": 900}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The runs, and `datatailor view` serving them on a free port of 127.0.0.1."""
    pytest.importorskip("sb3_contrib")
    base = tmp_path_factory.mktemp("viewer-browser")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATATAILOR_CACHE_DIR", str(base / "cache"))
        runs = build_runs(base / "made")
    order = ["refed", "codec", "coach", "teams", "coach_before", "bakeoff"]
    folders = [Path(shutil.copytree(runs[k], base / "open" / k)) for k in order]
    proc = subprocess.Popen([sys.executable, "-m", "datatailor", "view", *map(str, folders), "--port", "0", "--index-dir", str(base / "idx")],
                            env=cli_env(DATATAILOR_CACHE_DIR=str(base / "cache")), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, f"no address printed: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        yield {"url": url.group(0), "runs": dict(zip(order, folders))}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ["DATATAILOR_SCREENSHOT_DIR"]) if os.environ.get("DATATAILOR_SCREENSHOT_DIR") else tmp_path_factory.mktemp("viewer-shots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nviewer screenshots: {folder}")
    return folder


@pytest.fixture
def page(chromium: str, tmp_path: Path) -> Iterator[tuple[Any, list[str]]]:  # noqa: F811
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.set_default_timeout(20_000)
            p = context.new_page()
            p.on("console", lambda msg: errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
            p.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            p.on("requestfailed", lambda req: errors.append(f"request failed: {req.url} ({req.failure})"))
            yield p, errors
        finally:
            browser.close()


def snap(page: Any, folder: Path, name: str) -> None:
    shot = folder / f"viewer-{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(PNG_MAGIC)


def first_id(run: Path, pick: Any = lambda r: True) -> str:
    return next(r["id"] for r in read_jsonl(run / "data.jsonl") if pick(r))


@pytest.mark.timeout(240)
def test_every_page_loads_without_errors(served: dict[str, Any], page: tuple[Any, list[str]], shots: Path) -> None:
    p, errors = page
    url, runs = served["url"], served["runs"]
    codec_kept = first_id(runs["codec"], lambda r: r["metadata"]["codec"]["contrastive"]["iteration"] == 2)
    testset = json.loads((runs["bakeoff"] / "bakeoff_report.json").read_text())["testsets"][0]["name"]
    pages = [
        ("home", "", "h1"),
        ("run", "run/refed", "#stages"),
        ("records", "run/refed/records", "table.records tbody tr"),
        ("record-refed", f"run/refed/record/{first_id(runs['refed'])}", "#evidence-refed"),
        ("record-codec", f"run/codec/record/{codec_kept}", "#evidence-codec"),
        ("record-coach", f"run/coach/record/{first_id(runs['coach'], lambda r: r['instruction'].startswith('GOOD'))}", "#evidence-coach"),
        ("record-teams", f"run/teams/record/{first_id(runs['teams'])}", "#evidence-teams"),
        ("failures", "run/codec/failures", "#failure-groups"),
        ("compare", "compare?a=coach_before&b=coach", "#fig-length svg"),
        ("bakeoff", "bakeoff/bakeoff", "#bakeoff-table"),
        ("cell", f"bakeoff/bakeoff/cell/odd/{testset}", "section.judged"),
    ]
    for name, path, selector in pages:
        reply = p.goto(url + path, wait_until="load")
        assert reply is not None and reply.status == 200, (name, reply.status if reply else None)
        assert p.locator(selector).first.is_visible(), f"{name}: {selector} is not shown"
        snap(p, shots, name)
    assert errors == [], "the browser reported errors:\n" + "\n".join(errors)


@pytest.mark.timeout(240)
def test_search_filters_diff_and_a_flag_that_survives_a_reload(served: dict[str, Any], page: tuple[Any, list[str]], shots: Path) -> None:
    p, errors = page
    url, runs = served["url"], served["runs"]
    rows = p.locator("table.records tbody tr")

    # search: the whole table, then only the pair whose instruction has the word
    p.goto(url + "run/coach/records")
    assert rows.count() == 8
    p.fill("input[name=q]", "PROSE")
    p.press("input[name=q]", "Enter")
    p.wait_for_url(re.compile(r"q=PROSE"))
    assert rows.count() == 1 and "PROSE task" in rows.first.inner_text()

    # a select filters as soon as it changes; the quality range too
    p.goto(url + "run/codec/records")
    kept = rows.count()
    p.select_option("select[name=status]", "failed")
    p.wait_for_url(re.compile(r"status=failed"))
    failures = read_jsonl(runs["codec"] / "failures.jsonl")
    assert rows.count() == len(failures) != kept
    p.select_option("select[name=kind]", "below_threshold")
    p.wait_for_url(re.compile(r"kind=below_threshold"))
    assert rows.count() == sum(1 for f in failures if f["kind"] == "below_threshold") == 2
    p.goto(url + "run/coach/records")
    p.fill("input[name=qmin]", "4.5")
    p.press("input[name=qmin]", "Enter")
    p.wait_for_url(re.compile(r"qmin=4.5"))
    assert rows.count() == 1 and "GOOD task" in rows.first.inner_text()
    snap(p, shots, "records-filtered")

    # a record's diff: REFED's draft → improved response, the added words highlighted
    p.goto(url + f"run/refed/record/{first_id(runs['refed'])}")
    inserted = p.locator('[data-diff="refed"] ins')
    assert inserted.last.is_visible() and inserted.last.inner_text().strip() == "With an example."
    colour = inserted.last.evaluate("e => getComputedStyle(e).backgroundColor")
    assert colour not in ("rgba(0, 0, 0, 0)", "transparent")

    # a flag: click, reload, still there; the flags filter finds it; data.jsonl untouched
    target = first_id(runs["coach"], lambda r: r["instruction"].startswith("LONG"))
    data_before = (runs["coach"] / "data.jsonl").read_bytes()
    p.goto(url + f"run/coach/record/{target}")
    p.fill(".flag-text", "ten times too long")
    p.click("button.flag-btn[data-flag=bad]")
    p.wait_for_function("document.querySelector('.flag-state').textContent.startsWith('flagged bad')")
    p.reload()
    assert p.get_attribute("button.flag-btn[data-flag=bad]", "aria-pressed") == "true"
    assert p.input_value(".flag-text") == "ten times too long"
    assert p.locator("h2 .flag-bad").is_visible()
    snap(p, shots, "record-flagged")
    p.goto(url + "run/coach/records")
    p.select_option("select[name=flag]", "bad")
    p.wait_for_url(re.compile(r"flag=bad"))
    assert rows.count() == 1 and rows.first.get_attribute("data-id") == target
    assert (runs["coach"] / "data.jsonl").read_bytes() == data_before
    assert [r["id"] for r in read_jsonl(runs["coach"] / "flags.jsonl")] == [target]
    assert errors == [], "the browser reported errors:\n" + "\n".join(errors)
