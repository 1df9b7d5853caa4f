"""`datatailor view` without a browser: the index over real runs (finished and live), the records table's search
and filters, each method's evidence on a record's page, failures, two runs compared, a bake-off's table and cells,
review flags (the file, the `filter.flags` stage, `export --drop-flagged`), and the server's binding rules.

The runs are made by running small recipes on the scripted models of the methods' own tests (CodecLM, REFED with
its judge, CoachLM with ratings before and after, TeaMs-RL, a scripted bake-off), so the pages are checked against
what the runner really writes.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from datatailor.cli import main
from datatailor.errors import UserError
from datatailor.recipe import parse_recipe
from datatailor.runner import run_recipe_sync
from datatailor.stages.flags import append_flag, read_flags
from datatailor.viewer.index import CHECKPOINT, FAILED, FINAL, RunIndex, read_rows
from datatailor.viewer.query import Filters, records_page
from tests.conftest import cli_env
from tests.support import read_jsonl, write_rows

pytest.importorskip("starlette")

# ----------------------------------------------------------------------------- the runs, made by running recipes


def build_runs(base: Path) -> dict[str, Path]:
    """Small real runs of each method on scripted models, and a scripted bake-off; returns their folders."""
    from tests import test_coach, test_codec, test_refed

    runs: dict[str, Path] = {}
    codec_dir = base / "codec"
    codec_dir.mkdir(parents=True)
    test_codec.run(test_codec.make(codec_dir, test_codec.PIPELINE, test_codec.seed_rows(test_codec.SEEDS), budget_pairs=8, cache=False),
                   codec_dir / "out")
    runs["codec"] = codec_dir / "out"

    refed_dir = base / "refed"
    refed_dir.mkdir()
    judge = {"type": "judge.pairwise", "role": "judge", "a": "response", "b": "metadata.refed.draft", "rule": "strict"}
    test_refed.run(refed_dir, [*test_refed.FULL[:-1], judge, test_refed.FULL[-1]], budget_pairs=8)
    runs["refed"] = refed_dir / "out"

    coach_dir = base / "coach"
    coach_dir.mkdir()
    rater = {"backend": "scripted", "model": "rater", "handler": "tests.test_coach:rater"}
    test_coach.revise(coach_dir, [{"type": "quality.rate", "role": "judge"}, {"type": "coach.revise"},
                                  {"type": "quality.rate", "name": "after", "role": "judge", "key": "quality_after"}],
                      test_coach.ROWS, judge=rater)
    runs["coach"] = coach_dir / "out"
    # the same pairs before the recipe gained coach.revise: the "before" of a comparison
    test_coach.revise(coach_dir, [{"type": "quality.rate", "role": "judge"}], test_coach.ROWS, name="before", judge=rater)
    runs["coach_before"] = coach_dir / "before"

    teams_dir = base / "teams"
    teams_dir.mkdir()
    rows = [{"instruction": f"[{'AB'[i % 2]}] a question number {i} about cooking"} for i in range(4)]
    runs["teams"] = teams_run(teams_dir, rows)

    from datatailor.bakeoff.config import load_bakeoff
    from datatailor.bakeoff.run import run_bakeoff
    from tests.test_bakeoff import world as bakeoff_world

    run_bakeoff(load_bakeoff(bakeoff_world(base / "bake")), base / "bake" / "out", log_stream=None)
    runs["bakeoff"] = base / "bake" / "out"
    return runs


def teams_run(folder: Path, rows: list[dict[str, Any]]) -> Path:
    """TeaMs-RL's generation (random schedule, elimination on) on the scripted world of tests/test_teams.py."""
    from tests.test_teams import WORLD

    stages = [{"type": "teams.generate", "schedule": "random", "keep": "all", "elimination": True}]
    recipe = {"models": WORLD, "input": str(write_rows(folder / "seeds.jsonl", rows)), "stages": stages, "cache": False}
    run_recipe_sync(parse_recipe(recipe, "teams", folder), folder / "out", show_progress=False)
    return folder / "out"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("sb3_contrib")  # tests/test_teams.py (the TeaMs-RL world) needs it to import
    base = tmp_path_factory.mktemp("viewer-runs")
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the per-test cache fixture is not active yet
        mp.setenv("DATATAILOR_CACHE_DIR", str(base / "cache"))
        return build_runs(base)


@pytest.fixture
def fresh_runs(runs: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """Copies of the runs a test may write flags into."""
    return {k: Path(shutil.copytree(v, tmp_path / "runs" / k)) for k, v in runs.items() if k != "bakeoff"}


def built_index(run: Path, root: Path) -> RunIndex:
    index = RunIndex(run, root)
    index.refresh()
    return index


def page_ids(index: RunIndex, flags: dict[str, Any] | None = None, **params: str) -> list[str]:
    page = records_page(index, Filters.from_params(params), flags or {}, per_page=1000)
    return [r.id for r in page.rows]


# ----------------------------------------------------------------------------- the index


def test_the_index_of_a_finished_run_holds_every_row_where_the_files_have_it(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["refed"]
    index = built_index(run, tmp_path / "idx")
    data, failures = read_jsonl(run / "data.jsonl"), read_jsonl(run / "failures.jsonl")
    conn = index.connect()
    rows = conn.execute("SELECT id, status, stage, kind, file, offset, item FROM rows ORDER BY rowid").fetchall()
    paths = index.file_paths(conn)
    facets = index.facets(conn)["keys"]
    conn.close()
    assert [r[0] for r in rows if r[1] == FINAL] == [d["id"] for d in data]
    assert [(r[0], r[2], r[3]) for r in rows if r[1] == FAILED] == [(f["id"], f["stage"], f["kind"]) for f in failures]
    # every row reads back, from the files, the record it indexes
    back = read_rows(paths, [(r[4], r[5], r[6]) for r in rows])
    assert [(b.get("record") or b)["id"] for b in back] == [r[0] for r in rows]
    # failure counts by stage and kind are the manifest's
    manifest = json.loads((run / "manifest.json").read_text())
    expected = {f"failed|{s['name']}|{k}": n for s in manifest["stages"] for k, n in s["failure_kinds"].items()}
    assert {k: n for k, n in facets.items() if k.startswith("failed|")} == expected
    # a synthesized pair's stage of origin is the stage that wrote it; the coach's pairs came in with the input
    assert {r[2] for r in rows if r[1] == FINAL} == {"refed.synthesize"}
    coach = built_index(runs["coach"], tmp_path / "idx")
    conn = coach.connect()
    assert {s for (s,) in conn.execute("SELECT stage FROM rows WHERE status=?", (FINAL,))} == {"input"}
    conn.close()


def test_search_and_every_filter_narrow_the_rows(runs: dict[str, Path], tmp_path: Path) -> None:
    coach = built_index(runs["coach"], tmp_path / "idx")
    data = {r["instruction"].split()[0]: r["id"] for r in read_jsonl(runs["coach"] / "data.jsonl")}
    assert len(page_ids(coach)) == 8
    assert page_ids(coach, q="PROSE") == [data["PROSE"]]
    assert page_ids(coach, q="prose water cycle") == [data["PROSE"]]  # every word, any case
    assert page_ids(coach, q=data["SHORT"]) == [data["SHORT"]]  # an id
    assert page_ids(coach, q="Be specific") == [data["GOOD"]]  # the revised text is what is searched
    # the quality shown is the last rating (quality_after): only the revised pair was re-rated 5
    assert page_ids(coach, qmin="4.5") == [data["GOOD"]]
    assert page_ids(coach, qmin="5") == [data["GOOD"]] and page_ids(coach, qmin="5.5") == []  # the range holds its ends
    assert len(page_ids(coach, qmax="3")) == 7 and page_ids(coach, qmax="2.9") == []
    assert page_ids(coach, method="coachlm") == page_ids(coach) and page_ids(coach, method="refed") == []
    flags = {data["LONG"]: _flag("bad"), data["ECHO"]: _flag("good")}
    assert page_ids(coach, flags, flag="bad") == [data["LONG"]]
    assert page_ids(coach, flags, flag="any") == [data["LONG"], data["ECHO"]]
    assert len(page_ids(coach, flags, flag="none")) == 6
    assert page_ids(coach, sort="-length")[0] == data["GOOD"]  # the revision made its response the longest

    refed = built_index(runs["refed"], tmp_path / "idx")
    failures = read_jsonl(runs["refed"] / "failures.jsonl")
    kind = failures[-1]["kind"]
    assert page_ids(refed, kind=kind) == [f["id"] for f in failures if f["kind"] == kind]
    assert page_ids(refed, status="failed", stage="refed.references") == [f["id"] for f in failures if f["stage"] == "refed.references"]
    assert len(page_ids(refed, status="all")) == len(failures) + 8
    assert len(page_ids(refed, verdict="a")) == 8 and page_ids(refed, verdict="b") == []


def _flag(value: str) -> Any:
    from datatailor.stages.flags import Flag

    return Flag(value)


def test_counts_of_a_narrowed_table_are_exact_and_pages_split_it(runs: dict[str, Path], tmp_path: Path) -> None:
    refed = built_index(runs["refed"], tmp_path / "idx")
    first = records_page(refed, Filters.from_params({"status": "all"}), {}, per_page=5)
    second = records_page(refed, Filters.from_params({"status": "all", "page": "2"}), {}, per_page=5)
    total = len(read_jsonl(runs["refed"] / "data.jsonl")) + len(read_jsonl(runs["refed"] / "failures.jsonl"))
    assert total > 5 and (first.total, first.pages, first.capped) == (total, -(-total // 5), False)
    assert not {r.id for r in first.rows} & {r.id for r in second.rows}
    narrowed = records_page(refed, Filters.from_params({"q": "thing 3"}), {}, per_page=5)
    data = read_jsonl(runs["refed"] / "data.jsonl")
    assert narrowed.total == sum(1 for d in data if re.search(r"\bthing 3\b", d["instruction"] + d["response"]))


def test_a_count_past_the_cap_says_more_than(runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datatailor.viewer import query

    coach = built_index(runs["coach"], tmp_path / "idx")
    monkeypatch.setattr(query, "COUNT_CAP", 3)
    capped = records_page(coach, Filters.from_params({"q": "water"}), {}, per_page=2)
    assert (capped.total, capped.capped, capped.pages, len(capped.rows)) == (3, True, None, 2)
    exact = records_page(coach, Filters.from_params({"q": "PROSE"}), {}, per_page=2)
    assert (exact.total, exact.capped, exact.pages) == (1, False, 1)


def _render_section(record: dict[str, Any], judges: dict[str, tuple[str, str, str]] | None = None) -> str:
    from datatailor.viewer.app import _environment
    from datatailor.viewer.evidence import sections

    env = _environment()
    macro = env.get_template("_evidence.html").module.section  # type: ignore[attr-defined]
    return _text("".join(str(macro(s)) for s in sections(record, ["quality"], judges or {})))


def test_both_orders_are_never_swapped_on_the_page() -> None:
    """Scores that differ by order (a position-biased judge) land in their own rows and columns."""
    judged = {"id": "x", "instruction": "Q?", "response": "long answer", "metadata": {
        "reference": "short answer",
        "judge": {"a_first": [8.0, 5.0], "b_first": [5.0, 5.0], "mean_a": 6.5, "mean_b": 5.0, "rule": "strict",
                  "verdict": "tie", "position_consistent": False}}}
    text = _render_section(judged)
    assert "A first 8.0 5.0 A" in text and "B first 5.0 5.0 tie" in text and "mean 6.50 5.00" in text
    assert "Verdict under the strict rule: tie" in text and "flipped with the order" in text
    scores = {"strong_shown_first": {"strong": 9.0, "target": 2.0}, "target_shown_first": {"strong": 6.0, "target": 7.0},
              "position_consistent": False}
    codec = {"id": "y", "instruction": "Harder task", "response": "r", "metadata": {"codec": {
        "use_case": "u", "skills": ["s"], "contrastive": {"kept": None, "below_threshold": True, "iteration": 1, "G": 0.0,
                                                          "threshold": 1.0, "history": [{"iteration": 1, "instruction": "Task",
                                                                                         "scores": scores, "G": 0.0}]}}}}
    text = _render_section(codec)
    assert "1 Task 9.0 / 2.0 6.0 / 7.0 0.00 no" in text and "stayed at or below the threshold 1.0" in text


def test_teams_steps_follow_the_metadata_not_the_event_order() -> None:
    ns = {"seed_id": "s", "seed_instruction": "seed", "step": 3, "ops": ["deepening", "breadth", "concretizing"],
          "rewards": [1.0, 0.0, 1.0], "eliminated": [None, "judged equal", None], "schedule": "policy", "policy": None}
    text = _render_section({"id": "t", "instruction": "final", "metadata": {"teams_rl": ns}, "lineage": []})
    assert "1 deepening Not Equal (information gained) 1 kept" in text
    assert "2 breadth Equal (no gain) 0 eliminated : judged equal" in text
    assert "3 concretizing Not Equal (information gained) 1 kept" in text


SLOW_WRITER = {"backend": "scripted", "model": "slow", "latency_s": 0.1, "max_concurrency": 2,
               "rules": [{"match": r"Question number (\d+)", "reply": "Answer for {{ m[1] }}."}]}


def test_a_live_run_is_followed_as_its_checkpoints_grow_then_shown_as_finished(tmp_path: Path) -> None:
    rows = [{"instruction": f"Question number {i}: explain topic {i} briefly."} for i in range(60)]
    recipe = {"models": {"strong": SLOW_WRITER}, "input": str(write_rows(tmp_path / "in.jsonl", rows)), "cache": False,
              "stages": [{"type": "respond", "concurrency": 2}, {"type": "respond", "name": "again", "concurrency": 2}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    journal = out / "stages" / "00-respond" / "outputs.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "datatailor", "run", str(tmp_path / "r.yaml"), "--out", str(out), "--no-progress"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        index = RunIndex(out, tmp_path / "idx")
        _wait(lambda: _lines(journal) >= 6, proc, "the first outputs")
        index.refresh()
        conn = index.connect()
        first = conn.execute("SELECT rowid, id FROM rows WHERE stage='respond' ORDER BY rowid").fetchall()
        conn.close()
        assert first and all(r[1] for r in first)
        assert {s for (s,) in index.connect().execute("SELECT DISTINCT status FROM rows")} == {CHECKPOINT}
        db = index.path()
        _wait(lambda: _lines(journal) >= len(first) + 6, proc, "more outputs")
        index.refresh()
        conn = index.connect()
        grown = conn.execute("SELECT rowid, id FROM rows WHERE stage='respond' ORDER BY rowid").fetchall()
        conn.close()
        assert index.path() == db and grown[: len(first)] == first and len(grown) > len(first)  # extended, not rebuilt
        _wait(lambda: (out / "stages" / "01-again" / "outputs.jsonl").exists() and _lines(out / "stages" / "01-again" / "outputs.jsonl") >= 3,
              proc, "the second stage")
        index.refresh()
        conn = index.connect()
        # the first stage is complete: its journal's rows gave way to records.jsonl's, once each
        by_stage = dict(conn.execute("SELECT stage, count(*) FROM rows GROUP BY stage").fetchall())
        conn.close()
        assert by_stage["respond"] == 60
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    index.refresh()
    assert index.path() != db  # finished: a fresh index of data.jsonl and failures.jsonl
    conn = index.connect()
    assert conn.execute("SELECT count(*) FROM rows WHERE status=?", (FINAL,)).fetchone()[0] == 60
    assert conn.execute("SELECT count(*) FROM rows WHERE status!=?", (FINAL,)).fetchone()[0] == 0
    conn.close()


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _wait(ready: Any, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read().decode() if proc.stderr else ''}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def test_a_line_being_written_is_indexed_once_it_is_complete(tmp_path: Path) -> None:
    run = tmp_path / "run"
    folder = run / "stages" / "00-respond"
    folder.mkdir(parents=True)
    (run / "recipe.json").write_text(json.dumps({"stages": [{"type": "respond", "name": None}]}))
    (run / "manifest.json").write_text(json.dumps({"status": "running", "stages": []}))
    record = {"id": "r1", "instruction": "Name a colour.", "input": "", "response": "Blue.", "metadata": {}, "parents": [], "lineage": []}
    line = json.dumps({"src": "r1", "records": [record]}) + "\n"
    (folder / "outputs.jsonl").write_text(line + line[:20])  # the second row is still being written
    index = built_index(run, tmp_path / "idx")
    assert page_ids(index) == ["r1"]
    with (folder / "outputs.jsonl").open("a") as fh:
        fh.write(line.replace("r1", "r2")[20:])
    index.refresh()
    assert page_ids(index) == ["r1", "r2"]
    assert not (run / ".viewer").exists() and sorted(p.name for p in run.rglob("*")) == \
        ["00-respond", "manifest.json", "outputs.jsonl", "recipe.json", "stages"]  # nothing written into the run


# ----------------------------------------------------------------------------- flags


def test_flags_last_write_wins_clear_removes_and_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "flags.jsonl"
    append_flag(path, "a", "bad", "wrong answer")
    append_flag(path, "b", "note", "check the units")
    append_flag(path, "a", "good")
    append_flag(path, "b", "clear")
    append_flag(path, "c", "bad")
    with path.open("a") as fh:
        fh.write('{"id": "c", "flag": "go')  # a write cut off
    flags = read_flags(path)
    assert {k: (v.flag, v.note) for k, v in flags.items()} == {"a": ("good", ""), "c": ("bad", "")}
    path.write_text('{"id": "a", "flag": "bad"}\nnot json\n{"id": "b", "flag": "bad"}\n')
    with pytest.raises(UserError, match=r"flags.jsonl:2: malformed"):
        read_flags(path)
    path.write_text('{"id": "a", "flag": "terrible"}\n')
    with pytest.raises(UserError, match=r":1: unknown flag 'terrible'"):
        read_flags(path)


def test_filter_flags_drops_what_a_reviewer_flagged(fresh_runs: dict[str, Path], tmp_path: Path) -> None:
    reviewed = fresh_runs["coach"]
    data = {r["instruction"].split()[0]: r["id"] for r in read_jsonl(reviewed / "data.jsonl")}
    append_flag(reviewed / "flags.jsonl", data["LONG"], "bad", "too long to be useful")
    append_flag(reviewed / "flags.jsonl", data["ECHO"], "note", "odd wording")
    append_flag(reviewed / "flags.jsonl", data["SAME"], "bad")
    append_flag(reviewed / "flags.jsonl", data["SAME"], "clear")  # changed their mind

    def filtered(name: str, **cfg: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        recipe = {"models": {}, "input": str(reviewed / "data.jsonl"), "cache": False,
                  "stages": [{"type": "filter.flags", "flags": str(reviewed), **cfg}]}
        result = run_recipe_sync(parse_recipe(recipe, "f", tmp_path), tmp_path / name, show_progress=False)
        assert result.status == "complete"
        return read_jsonl(tmp_path / name / "data.jsonl"), read_jsonl(tmp_path / name / "failures.jsonl")

    kept, dropped = filtered("bad")
    assert [d["id"] for d in dropped] == [data["LONG"]] and dropped[0]["kind"] == "flagged"
    assert "too long to be useful" in dropped[0]["message"]
    assert sorted(k["id"] for k in kept) == sorted(v for k, v in data.items() if k != "LONG")
    kept, dropped = filtered("bad-and-notes", drop=["bad", "note"])
    assert sorted(d["id"] for d in dropped) == sorted([data["LONG"], data["ECHO"]]) and len(kept) == 6
    with pytest.raises(UserError, match="does not exist"):
        recipe = {"models": {}, "input": str(reviewed / "data.jsonl"), "stages": [{"type": "filter.flags", "flags": str(tmp_path / "nope")}]}
        run_recipe_sync(parse_recipe(recipe, "f", tmp_path), tmp_path / "never", show_progress=False)
    assert not (tmp_path / "never").exists()  # refused before the run directory was touched


def test_export_drop_flagged(fresh_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fresh_runs["coach"]
    out = tmp_path / "train.jsonl"
    assert main(["export", str(run), "--out", str(out), "--drop-flagged"]) == 2
    assert "has no flags.jsonl" in capsys.readouterr().err
    ids = [r["id"] for r in read_jsonl(run / "data.jsonl")]
    append_flag(run / "flags.jsonl", ids[2], "bad")
    append_flag(run / "flags.jsonl", ids[3], "good")
    before = (run / "data.jsonl").read_bytes()
    assert main(["export", str(run), "--out", str(out), "--drop-flagged"]) == 0
    assert "dropped 1 of 8 records flagged bad" in capsys.readouterr().out
    exported = read_jsonl(out)
    assert len(exported) == 7 and all(e["instruction"] != read_jsonl(run / "data.jsonl")[2]["instruction"] for e in exported)
    assert (run / "data.jsonl").read_bytes() == before


# ----------------------------------------------------------------------------- the pages


@pytest.fixture(scope="module")
def client(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The app over copies of the runs (the flags test writes into its copy of the coach run)."""
    from starlette.testclient import TestClient

    from datatailor.viewer.app import create_app
    from datatailor.viewer.registry import Registry

    tmp_path = tmp_path_factory.mktemp("viewer-app")
    order = ["codec", "refed", "coach", "teams", "coach_before", "bakeoff"]
    copies = [Path(shutil.copytree(runs[k], tmp_path / "open" / k)) / "" for k in order]
    registry = Registry([p.parent / k for p, k in zip(copies, order)], tmp_path / "idx")
    for entry in registry.runs.values():
        entry.index.refresh()
    with TestClient(create_app(registry), base_url="http://127.0.0.1") as c:
        c.runs = {k: tmp_path / "open" / k for k in order}  # type: ignore[attr-defined]
        yield c


def _text(page: str) -> str:
    """A page's text as a reader sees it: tags gone, entities decoded, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def test_the_run_page_shows_status_stages_usage_and_recipe(client: Any) -> None:
    html = client.get("/run/refed").text
    usage = json.loads((client.runs["refed"] / "usage.json").read_text())["total"]
    text = _text(html)
    assert "status: complete" in text
    for stage in json.loads((client.runs["refed"] / "manifest.json").read_text())["stages"]:
        assert f"{stage['name']} {stage['type']}" in text
    assert f"refed.improve {usage['stages']['refed.improve']['requests']} " in text
    assert f"teacher {usage['roles']['teacher']['requests']} " in text
    assert "multi_turn 1, no_response 1" in text and "reports/refed_report.html" in text and "handler: tests.test_refed:teacher" in html
    assert client.get("/run/refed/file/reports/refed_report.html").status_code == 200
    assert client.get("/run/refed/file/../../../../etc/passwd").status_code == 404
    assert client.get("/run/refed/file/recipe.json").status_code == 200
    assert client.get("/run/nope").status_code == 404


def _record_page(client: Any, key: str, pick: Any) -> str:
    record = next(r for r in read_jsonl(client.runs[key] / "data.jsonl") if pick(r))
    reply = client.get(f"/run/{key}/record/{record['id']}")
    assert reply.status_code == 200
    return reply.text


def test_codec_evidence_shows_metadata_rubrics_and_both_order_scores(client: Any) -> None:
    html = _record_page(client, "codec", lambda r: r["metadata"]["codec"]["contrastive"]["iteration"] == 2)
    text = _text(html)
    assert "use case late" in text and "trip planning, budgeting" in text
    assert "Rubric 1: depth level 1 Add requirement 1" in text
    # iteration 1: both answered well (8 each, both orders); iteration 2 after an action: strong 9, target 2
    assert re.search(r"1 Task \S+ about late .*? 9\.0 / 8\.0 9\.0 / 8\.0 1\.00 yes", text)
    assert re.search(r"2 Task \S+ about late [^|]*?\(harder: add requirement \d\) 9\.0 / 2\.0 9\.0 / 2\.0 7\.00 yes", text)
    assert "Kept with the strong model's answer at iteration 2" in text
    assert "<ins>" in html  # the action's rewrite of the instruction, as a diff


def test_refed_evidence_shows_reference_feedback_and_the_improvement_as_a_diff(client: Any) -> None:
    html = _record_page(client, "refed", lambda r: True)
    text = _text(html)
    assert "reference instruction How do I do thing" in text and "response feedback feedback on" in text
    diff = re.search(r'data-diff="refed">(.*?)</div>', html, re.DOTALL)[1]
    assert [x.strip() for x in re.findall(r"<ins>(.*?)</ins>", diff, re.DOTALL)] == ["Improved:", "With an example."]
    assert "<del>" not in diff  # the draft is kept whole inside the improvement
    assert "A first 8.0 5.0 A" in text and "B first 8.0 5.0 A" in text  # the judge filter's scores, both orders


def test_coach_evidence_shows_the_diff_or_why_the_original_was_kept(client: Any) -> None:
    revised = _record_page(client, "coach", lambda r: r["instruction"].startswith("GOOD"))
    assert "Be specific." in [x.strip() for x in re.findall(r"<ins>(.*?)</ins>", revised, re.DOTALL)]
    assert "quality 3.0, quality_after 5.0" in _text(revised)
    kept = _text(_record_page(client, "coach", lambda r: r["instruction"].startswith("SHORT")))
    assert "The original pair was kept (too short): the revised response is 0.07× the original's length (< 0.5)" in kept
    assert "What the coach proposed (not used)" in kept and "No." in kept
    prose = _text(_record_page(client, "coach", lambda r: r["instruction"].startswith("PROSE")))
    assert "The coach's reply (it did not parse) I think this pair is fine" in prose


def test_teams_evidence_shows_the_operation_chain_and_reviewer_verdicts(client: Any) -> None:
    record = read_jsonl(client.runs["teams"] / "data.jsonl")[0]
    ns = record["metadata"]["teams_rl"]
    text = _text(client.get(f"/run/teams/record/{record['id']}").text)
    for step, (op, reward, why) in enumerate(zip(ns["ops"], ns["rewards"], ns["eliminated"]), 1):
        verdict = "Not Equal (information gained)" if reward == 1 else "Equal (no gain)"
        outcome = f"eliminated : {why}" if why else "kept"
        assert f"{step} {op.replace('_', ' ')} {verdict} (rv) {reward:.0f} {outcome}" in text


def test_the_failures_page_groups_by_stage_and_kind(client: Any) -> None:
    text = _text(client.get("/run/codec/failures").text)
    failures = read_jsonl(client.runs["codec"] / "failures.jsonl")
    assert f"{len(failures)} failed records" in text
    assert "codec.contrastive below_threshold 2" in text and "codec.encode parse_error 1" in text
    assert "GARBLE seed that the encoder cannot read" in text  # an example, with its message
    rows = client.get("/run/codec/records?kind=below_threshold").text
    assert len(re.findall(r"<tr class=\"status-failed\"", rows)) == 2


def test_flags_are_written_beside_the_data_never_into_it(client: Any) -> None:
    run = client.runs["coach"]
    rid = read_jsonl(run / "data.jsonl")[1]["id"]
    before = (run / "data.jsonl").read_bytes()
    body = {"id": rid, "flag": "bad", "note": "made-up fact"}
    assert client.post("/api/run/coach/flag", json=body).status_code == 400  # not from the viewer's page
    reply = client.post("/api/run/coach/flag", json=body, headers={"X-Datatailor-View": "1"})
    assert reply.status_code == 200 and reply.json()["flag"]["flag"] == "bad"
    assert read_flags(run / "flags.jsonl")[rid].note == "made-up fact"
    assert (run / "data.jsonl").read_bytes() == before
    rows = client.get("/run/coach/records?flag=bad").text
    assert re.findall(r'data-id="([0-9a-f]{16})"', rows) == [rid]
    assert 'flag-btn flag-bad" data-flag="bad" aria-pressed="true"' in client.get(f"/run/coach/record/{rid}").text
    bad = client.post("/api/run/coach/flag", json={"id": rid, "flag": "awful"}, headers={"X-Datatailor-View": "1"})
    assert bad.status_code == 400


def test_no_flags_mode_writes_nothing(runs: dict[str, Path], tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from datatailor.viewer.app import create_app
    from datatailor.viewer.registry import Registry

    run = Path(shutil.copytree(runs["coach"], tmp_path / "coach"))
    with TestClient(create_app(Registry([run], tmp_path / "idx"), allow_flags=False), base_url="http://127.0.0.1") as c:
        rid = read_jsonl(run / "data.jsonl")[0]["id"]
        assert c.post("/api/run/coach/flag", json={"id": rid, "flag": "bad"}, headers={"X-Datatailor-View": "1"}).status_code == 403
        assert "flag-btn" not in c.get(f"/run/coach/record/{rid}").text
        assert c.get("/", headers={"Host": "evil.example"}).status_code == 400  # DNS rebinding: only our own host names
    assert not (run / "flags.jsonl").exists()


def test_two_runs_side_by_side(client: Any) -> None:
    html = client.get("/compare?a=coach_before&b=coach").text
    text = _text(html)
    assert "8 kept ids in both runs; 0 only in A, 0 only in B" in text
    for fig in ("fig-length", "fig-quality", "fig-distinct2"):
        assert f'<figure id="{fig}">' in html
    different = client.get("/compare?a=coach_before&b=coach&different=1").text
    good = next(r for r in read_jsonl(client.runs["coach"] / "data.jsonl") if r["instruction"].startswith("GOOD"))
    assert re.findall(r"/compare/record/([0-9a-f]{16})", different) == [good["id"]]  # only the revised pair differs
    side = _text(client.get(f"/compare/record/{good['id']}?a=coach_before&b=coach").text)
    assert "Here is one more step and an example." in side and "A → B" in side


def test_the_bakeoff_table_and_a_cells_judged_items(client: Any) -> None:
    report = json.loads((client.runs["bakeoff"] / "bakeoff_report.json").read_text())
    text = _text(client.get("/bakeoff/bakeoff").text)
    testsets = [t["name"] for t in report["testsets"]]
    for name, m in report["methods"].items():
        cells = " ".join(f"{c['wins']} / {c['ties']} / {c['losses']} {100 * c['crr']:.1f} %"
                         for c in (m["testsets"][ts] for ts in testsets))
        assert re.search(rf"\b{name}\b.*?{re.escape(cells.split(' ')[0])}", text)
        for ts in testsets:
            c = m["testsets"][ts]
            assert f"{c['wins']} / {c['ties']} / {c['losses']} {100 * c['crr']:.1f} %" in text
    ts = testsets[0]
    odd = report["methods"]["odd"]["testsets"][ts]
    wins = client.get(f"/bakeoff/bakeoff/cell/odd/{ts}?verdict=a").text
    assert f"{odd['wins']} items" in _text(wins)
    item = _text(wins.split('<section class="judged"')[1])
    number = int(re.search(r"Question (\d+)", item)[1])
    assert number % 2 == 1  # odd wins on odd-numbered questions only
    assert f"odd answer to: Question {number}" in item and "reference answer" in item
    assert "tuned target first 9.0 5.0 tuned target" in item and "reference first 9.0 5.0 tuned target" in item
    ties = _text(client.get(f"/bakeoff/bakeoff/cell/odd/{ts}?verdict=tie").text)
    assert f"{odd['ties']} items" in ties and "tuned target first 5.0 5.0 tie" in ties
    assert client.get("/bakeoff/bakeoff/cell/odd/nowhere").status_code == 404


def test_every_page_of_every_run_renders(client: Any) -> None:
    for key in ("codec", "refed", "coach", "teams"):
        for path in ("", "/records", "/records?status=all", "/failures"):
            assert client.get(f"/run/{key}{path}").status_code == 200, (key, path)
        listing = client.get(f"/run/{key}/records?status=all").text
        for rid in re.findall(r"/record/([0-9a-f]{16})\?at=", listing):
            assert client.get(f"/run/{key}/record/{rid}").status_code == 200, (key, rid)
    assert client.get("/run/codec/record/0000000000000000").status_code == 404
    status = client.get("/api/run/codec/status").json()
    assert status["status"] == "shortfall" and status["index"]["phase"] == "ready"


# ----------------------------------------------------------------------------- the command


def test_view_binds_127_0_0_1_prints_the_address_and_refuses_other_hosts(runs: dict[str, Path], tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from datatailor.viewer.server import check_host

    with pytest.raises(UserError, match="--allow-remote"):
        check_host("0.0.0.0", allow_remote=False)
    assert "WARNING" in (check_host("0.0.0.0", allow_remote=True) or "")
    assert check_host("127.0.0.1", allow_remote=False) is None
    assert main(["view", str(runs["coach"]), "--host", "0.0.0.0"]) == 2
    assert "binds 127.0.0.1 only" in capsys.readouterr().err
    assert main(["view", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    assert main(["view", str(runs["coach"]), "--index-dir", str(runs["coach"] / "data.jsonl" / "idx")]) == 2
    assert "give a writable folder with --index-dir" in capsys.readouterr().err
    env = cli_env(DATATAILOR_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "datatailor", "view", str(runs["coach"]), "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert url, line
        import urllib.request

        with urllib.request.urlopen(url.group(0), timeout=30) as reply:  # one run: the start page is the run's
            assert reply.url.endswith("/run/coach-out")
        with urllib.request.urlopen(url.group(0) + "run/coach-out/records", timeout=30) as reply:
            assert reply.status == 200 and "PROSE task" in reply.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
