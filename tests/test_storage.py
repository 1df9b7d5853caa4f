"""Object storage: journals as write-once segments, the driver's staging folder mirrored to `--out s3://…`, inputs
read from `s3://…`, and credentials kept out of everything a run writes. Against moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from datatailor.recipe import parse_recipe
from datatailor.runner import run_recipe
from datatailor.storage import JournalPusher, RunStore, iter_journal_rows
from tests.conftest import cli_env
from tests.s3_support import SECRET, environment, make_bucket, moto_s3
from tests.support import echo_model, questions, write_rows


@pytest.fixture(scope="module")
def s3() -> Any:
    with moto_s3() as env:
        yield env


@pytest.fixture
def bucket(s3: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    name = f"b{abs(hash(tmp_path)) % 10**9}"
    with environment(s3):
        fs = make_bucket(s3, name)
        monkeypatch.setenv("DATATAILOR_STAGING_DIR", str(tmp_path / "staging"))
        monkeypatch.setenv("DATATAILOR_SPOOL_DIR", str(tmp_path / "spool"))
        yield name, fs


def test_a_journal_is_its_segments_in_order_and_a_rewrite_starts_a_new_generation(bucket: Any, tmp_path: Path) -> None:
    name, fs = bucket
    store = RunStore(f"s3://{name}/run")
    local = tmp_path / "outputs.jsonl"
    local.write_text('{"n": 1}\n{"n": 2}\n{"n": 3, "torn')  # a torn last line is not uploaded
    pusher = JournalPusher(store, local, "stages/00-x/outputs.jsonl")
    pusher.push()
    with local.open("a") as fh:
        fh.write('": 1}\n{"n": 4}\n')
    pusher.push()
    assert pusher.push() == 0  # nothing new
    assert [r["n"] for r in iter_journal_rows(store, "stages/00-x/outputs.jsonl")] == [1, 2, 3, 4]
    assert len(store.segments("stages/00-x/outputs.jsonl")) == 2
    # compaction renames a new file over the journal: a new generation replaces the old one's segments
    new = tmp_path / "new.jsonl"
    new.write_text('{"n": 9}\n')
    new.replace(local)
    pusher.push()
    assert [r["n"] for r in iter_journal_rows(store, "stages/00-x/outputs.jsonl")] == [9]
    assert [gen for gen, _, _ in store.segments("stages/00-x/outputs.jsonl")] == [1]
    # a rewrite to an empty file still replaces the old content
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    empty.replace(local)
    pusher.push()
    assert list(iter_journal_rows(store, "stages/00-x/outputs.jsonl")) == []


def test_a_gap_between_segments_ends_the_journal(bucket: Any) -> None:
    name, _ = bucket
    store = RunStore(f"s3://{name}/run")
    store.append_segment("j.jsonl", 0, 0, b'{"a": 1}\n')
    store.append_segment("j.jsonl", 0, 30, b'{"a": 3}\n')  # bytes 9..30 never arrived
    assert [r["a"] for r in iter_journal_rows(store, "j.jsonl")] == [1]
    assert store.journal_end("j.jsonl") == (0, 9)


def _big_journal(path: Path, mb: int) -> bytes:
    line = (json.dumps({"src": "x" * 20, "text": "y" * 980}) + "\n").encode()
    data = line * (mb * 1000)
    path.write_bytes(data + b'{"torn')
    return data


def python_peak_of_upload(kind: str, url: str, local: str, block: int) -> None:
    """Run in a subprocess by the test below (the tests' moto server lives in the test process, and tracemalloc
    would count the objects it stores): prints the most memory Python held at once (tracemalloc: every thread's
    bytes objects and buffers) while pushing `local` as a journal or putting it as a whole object."""
    import tracemalloc

    from datatailor import storage

    storage.UPLOAD_BLOCK = block
    store = RunStore(url)
    store.exists("")  # the client is set up before the measure
    tracemalloc.start()
    if kind == "push":
        JournalPusher(store, Path(local), "stages/00-x/outputs.jsonl").push()
    else:
        store.put_file(Path(local), "data.jsonl")
    print(tracemalloc.get_traced_memory()[1])


def _upload_peak(kind: str, url: str, local: Path) -> int:
    code = f"from tests.test_storage import python_peak_of_upload as m; m({kind!r}, {url!r}, {str(local)!r}, {5 << 20})"
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_uploads_are_streamed_a_journal_or_file_far_larger_than_the_block_never_in_memory_whole(bucket: Any, tmp_path: Path) -> None:
    """The driver's peak RSS grew with the run's size because s3fs's put_file read a whole final file (or 10
    parts of 50 MB) and a journal push read 64 MB blocks and sliced them. Both now stream: the memory a push or
    a put holds is about one upload block (5 MB here), whatever the size."""
    name, fs = bucket
    store = RunStore(f"s3://{name}/run")
    data = _big_journal(tmp_path / "outputs.jsonl", 40)
    peak = _upload_peak("push", store.root, tmp_path / "outputs.jsonl")
    assert peak < 24 << 20, f"a push of a 40 MB journal held {peak / 2**20:.0f} MB"
    assert b"".join(store.journal_chunks("stages/00-x/outputs.jsonl")) == data  # the torn last line left for later
    assert len(store.segments("stages/00-x/outputs.jsonl")) == 1  # under SEGMENT_BYTES: one segment
    peak = _upload_peak("put", store.root, tmp_path / "outputs.jsonl")
    assert peak < 24 << 20, f"a put of a 40 MB file held {peak / 2**20:.0f} MB"
    fs.invalidate_cache()
    assert fs.cat_file(f"{name}/run/data.jsonl") == data + b'{"torn'


def test_a_push_cuts_segments_at_line_ends_and_a_line_longer_than_a_segment_is_still_pushed(
        bucket: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datatailor import storage

    monkeypatch.setattr(storage, "SEGMENT_BYTES", 4096)
    name, _ = bucket
    store = RunStore(f"s3://{name}/run")
    local = tmp_path / "outputs.jsonl"
    rows = [{"n": i, "text": "z" * (100 if i != 7 else 10_000)} for i in range(60)]  # row 7 alone is over a segment
    local.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert JournalPusher(store, local, "j.jsonl").push() == local.stat().st_size
    assert [r["n"] for r in iter_journal_rows(store, "j.jsonl")] == list(range(60))
    sizes = []
    for _, _, seg in store.segments("j.jsonl"):
        body = store.read_bytes(seg) or b""
        assert body.endswith(b"\n"), seg  # whole lines only
        sizes.append(len(body))
    assert len(sizes) > 2 and sum(sizes) == local.stat().st_size
    assert sorted(sizes)[-2] <= 4096 < max(sizes)  # only the segment holding the long line is over the limit
    # read back in ranges, never a whole segment at once; a re-upload overlapping what was read is not repeated
    monkeypatch.setattr(storage, "READ_BLOCK", 1000)
    _, _, last = store.segments("j.jsonl")[-1]
    tail = store.read_bytes(last) or b""
    start = local.stat().st_size - len(tail)
    store.append_segment("j.jsonl", 0, start + 50, tail[50:] + b'{"n": 60}\n')
    chunks = list(store.journal_chunks("j.jsonl"))
    assert max(map(len, chunks)) <= 1000
    assert b"".join(chunks) == local.read_bytes() + b'{"n": 60}\n'
    assert store.journal_end("j.jsonl") == (0, local.stat().st_size + 10)


def test_an_upload_that_fails_midway_leaves_no_object(bucket: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datatailor import storage

    monkeypatch.setattr(storage, "UPLOAD_BLOCK", 5 << 20)
    name, fs = bucket
    store = RunStore(f"s3://{name}/run")
    data = _big_journal(tmp_path / "big.jsonl", 12)  # a multipart upload has begun when the source runs short
    with (tmp_path / "big.jsonl").open("rb") as fh, pytest.raises(RuntimeError, match="short"):
        store.upload("data.jsonl", fh, len(data) + 10_000)
    fs.invalidate_cache()
    assert not store.exists("data.jsonl")
    assert fs.list_multipart_uploads(name) == []  # aborted, not left to be billed
    local = RunStore(tmp_path / "local")
    with (tmp_path / "big.jsonl").open("rb") as fh, pytest.raises(RuntimeError, match="short"):
        local.upload("data.jsonl", fh, len(data) + 10_000)
    assert not any((tmp_path / "local").iterdir())  # nor a temp file on a disk


def _recipe(tmp: Path, input_path: str, n: int = 40) -> Any:
    return parse_recipe({"models": {"strong": echo_model()}, "input": input_path,
                         "stages": [{"type": "respond", "role": "strong", "concurrency": 4}, {"type": "dedup"}], "cache": False},
                        "s3-test", tmp)


def test_the_local_executor_reads_and_writes_s3_with_the_bytes_of_a_local_run(bucket: Any, tmp_path: Path) -> None:
    name, fs = bucket
    rows = questions(40) + questions(5)  # repeats: dedup drops them
    write_rows(tmp_path / "input.jsonl", rows)
    fs.put(str(tmp_path / "input.jsonl"), f"{name}/in/input.jsonl")
    local = asyncio.run(run_recipe(_recipe(tmp_path, "input.jsonl"), tmp_path / "local", show_progress=False))
    remote = asyncio.run(run_recipe(_recipe(tmp_path, f"s3://{name}/in/input.jsonl"), f"s3://{name}/run", show_progress=False))
    assert local.status == remote.status == "complete" and remote.records == 40
    assert str(remote.out_dir) == f"s3://{name}/run"
    fs.invalidate_cache()
    for file in ("data.jsonl", "failures.jsonl"):
        assert fs.cat_file(f"{name}/run/{file}") == (tmp_path / "local" / file).read_bytes(), file
    manifest = json.loads(fs.cat_file(f"{name}/run/manifest.json"))
    assert manifest["status"] == "complete" and manifest["storage"]["out"] == f"s3://{name}/run"
    usage = json.loads(fs.cat_file(f"{name}/run/usage.json"))
    assert usage["run"]["all"]["requests"] == 45 and usage["total"]["unaccounted_requests"] == 0
    # the credentials are nowhere in what the run wrote, in the store or in the staging folder
    for key in fs.find(f"{name}/run"):
        assert SECRET.encode() not in fs.cat_file(key), key
    for path in (tmp_path / "staging").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    # a second run of the same command is a resume: nothing recomputed, same bytes
    again = asyncio.run(run_recipe(_recipe(tmp_path, f"s3://{name}/in/input.jsonl"), f"s3://{name}/run", show_progress=False))
    assert again.status == "complete" and again.usage["run"]["all"]["requests"] == 0
    assert again.usage["total"]["all"]["requests"] == 45


def test_a_resume_elsewhere_downloads_the_run_and_a_stale_staging_folder_is_not_trusted(bucket: Any, tmp_path: Path,
                                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from datatailor.runner.remote import StagedRun

    name, fs = bucket
    url = f"s3://{name}/run"
    monkeypatch.setenv("DATATAILOR_STAGING_DIR", str(tmp_path / "machine-a"))
    a = StagedRun(url)
    assert a.pull() == "new"
    (a.local / "stages" / "00-x").mkdir(parents=True)
    (a.local / "stages" / "00-x" / "outputs.jsonl").write_text('{"src": "1"}\n')
    (a.local / "manifest.json").write_text('{"status": "running"}')
    a.push()
    monkeypatch.setenv("DATATAILOR_STAGING_DIR", str(tmp_path / "machine-b"))
    b = StagedRun(url)
    assert b.pull() == "downloaded"
    assert (b.local / "stages" / "00-x" / "outputs.jsonl").read_text() == '{"src": "1"}\n'
    with (b.local / "stages" / "00-x" / "outputs.jsonl").open("a") as fh:
        fh.write('{"src": "2"}\n')
    b.push()
    assert [r["src"] for r in iter_journal_rows(b.store, "stages/00-x/outputs.jsonl")] == ["1", "2"]
    # machine A's folder predates B's work: it must be replaced, not pushed over B's
    monkeypatch.setenv("DATATAILOR_STAGING_DIR", str(tmp_path / "machine-a"))
    a2 = StagedRun(url)
    assert a2.pull() == "downloaded"
    assert (a2.local / "stages" / "00-x" / "outputs.jsonl").read_text() == '{"src": "1"}\n{"src": "2"}\n'
    assert b.pull() == "downloaded"  # and now B's is the stale one


def test_a_parquet_input_in_s3_is_streamed(bucket: Any, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datatailor.io import iter_records

    name, fs = bucket
    table = pa.Table.from_pylist([{"instruction": f"task {i}", "output": f"answer {i}"} for i in range(10_000)])
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=1000)
    fs.put(str(tmp_path / "in.parquet"), f"{name}/in.parquet")
    records = list(iter_records(f"s3://{name}/in.parquet"))
    assert [r.instruction for r in records[:2]] == ["task 0", "task 1"] and len(records) == 10_000
    assert records[-1].response == "answer 9999"


def test_bad_urls_are_clear_errors(s3: dict[str, str], tmp_path: Path) -> None:
    write_rows(tmp_path / "input.jsonl", questions(3))
    (tmp_path / "r.yaml").write_text(json.dumps({"models": {"strong": echo_model()}, "input": "input.jsonl",
                                                  "stages": [{"type": "respond", "role": "strong"}]}))
    env = cli_env(**s3, DATATAILOR_STAGING_DIR=str(tmp_path / "staging"), DATATAILOR_CACHE_DIR=str(tmp_path / "c"))
    run = [sys.executable, "-m", "datatailor", "run", str(tmp_path / "r.yaml"), "--no-progress", "--out"]
    creds = subprocess.run(run + ["s3://AKIA:secretvalue@bucket/run"], env=env, capture_output=True, text=True, timeout=120)
    assert creds.returncode == 2 and "must not carry credentials" in creds.stderr
    assert "secretvalue" not in creds.stderr + creds.stdout
    (tmp_path / "r2.yaml").write_text(json.dumps({"models": {"strong": echo_model()}, "input": "s3://no-such-bucket/in.jsonl",
                                                   "stages": [{"type": "respond", "role": "strong"}]}))
    missing = subprocess.run([sys.executable, "-m", "datatailor", "run", str(tmp_path / "r2.yaml"), "--no-progress", "--out",
                              str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "input not found: s3://no-such-bucket/in.jsonl" in missing.stderr, missing.stderr


def test_force_over_another_recipes_run_in_s3_discards_its_spend_and_parts(bucket: Any, tmp_path: Path) -> None:
    name, fs = bucket
    write_rows(tmp_path / "input.jsonl", questions(12))
    url = f"s3://{name}/run"
    first = asyncio.run(run_recipe(_recipe(tmp_path, "input.jsonl"), url, show_progress=False))
    assert first.usage["total"]["all"]["requests"] == 12
    other = parse_recipe({"models": {"strong": echo_model()}, "input": "input.jsonl", "cache": False,
                          "stages": [{"type": "respond", "role": "strong", "concurrency": 2}]}, "s3-other", tmp_path)
    with pytest.raises(Exception, match="different recipe"):
        asyncio.run(run_recipe(other, url, show_progress=False))
    second = asyncio.run(run_recipe(other, url, force=True, show_progress=False))
    assert second.status == "complete"
    # the discarded run's spend is not this run's total, and its stage folders are gone from the store
    assert second.usage["total"]["all"]["requests"] == second.usage["run"]["all"]["requests"] == 12
    fs.invalidate_cache()
    assert not [k for k in fs.find(f"{name}/run/stages") if "01-dedup" in k]


def test_a_malformed_line_of_an_s3_input_is_named_with_its_line(bucket: Any) -> None:
    from datatailor.errors import UserError
    from datatailor.io import iter_records

    name, fs = bucket
    fs.pipe_file(f"{name}/bad.jsonl", b'{"instruction": "a"}\n\n{"instruction": "b"}\n{"instruction": \n')
    with pytest.raises(UserError, match=rf"s3://{name}/bad.jsonl:4: malformed JSON line"):
        list(iter_records(f"s3://{name}/bad.jsonl"))


def test_the_python_api_runs_into_s3_and_refuses_a_url_where_only_a_folder_works(bucket: Any, tmp_path: Path) -> None:
    import shutil

    import datatailor as dt
    from datatailor.errors import UserError

    name, fs = bucket
    write_rows(tmp_path / "input.jsonl", questions(12))
    url = f"s3://{name}/api-run"
    run = dt.run(_recipe(tmp_path, "input.jsonl"), out=url)
    assert run.status == "complete" and run.out == url and len(run.records) == 12
    fs.invalidate_cache()
    assert fs.exists(f"{name}/api-run/data.jsonl") and not (Path.cwd() / "s3:").exists()
    # load_run reads the store, also on a machine whose staging folder is gone
    shutil.rmtree(tmp_path / "staging")
    again = dt.load_run(url)
    assert [r.id for r in again.records] == [r.id for r in run.records] and again.status == "complete"
    with pytest.raises(UserError, match="object-store URL"):
        dt.compare([str(tmp_path)], out=f"s3://{name}/report.html")
