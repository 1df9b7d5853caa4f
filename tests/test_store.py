"""Bounded memory: compact id sets and indexes, record sources, and a map stage that reads its input as a stream."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

import pytest

from datatailor.io import iter_records, read_records
from datatailor.records import Record, stable_hash
from datatailor.stages.base import MapStage, StageConfig
from datatailor.store import IdIndex, IdSet, JsonlSource, ListSource, RecordWriter, id_digest
from tests.support import make_recipe, questions, read_jsonl, run, write_rows


def test_id_set_behaves_like_a_set_across_merges() -> None:
    rng = random.Random(0)
    ids = [f"id-{rng.randrange(5000)}" for _ in range(3000)]
    compact, plain = IdSet(merge_every=64), set()
    for i in ids:
        assert compact.add(i) == (i not in plain)
        plain.add(i)
    assert len(compact) == len(plain)
    probes = [f"id-{k}" for k in range(6000)]
    assert [p in compact for p in probes] == [p in plain for p in probes]


def test_id_digests_never_end_in_a_zero_byte() -> None:
    # numpy's fixed-width bytes drop trailing zeros: a digest ending in 0x00 would never be found again
    assert all(id_digest(f"r{i}")[-1] != 0 for i in range(2000))
    found = IdSet(merge_every=8)
    for i in range(2000):
        found.add(f"r{i}")
    assert all(f"r{i}" in found for i in range(2000))


def test_id_index_finds_each_rows_offset_and_the_last_row_wins(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    rows = [{"src": f"r{i % 50}", "n": i} for i in range(120)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    index = IdIndex.of_journal(path, "src")
    assert len(index) == 50
    with path.open("rb") as fh:
        for k in range(50):
            offset = index.offset(f"r{k}")
            fh.seek(offset)
            assert json.loads(fh.readline()) == {"src": f"r{k}", "n": max(i for i in range(120) if i % 50 == k)}
    assert index.offset("absent") is None


def test_a_source_digest_is_the_hash_of_its_ids_and_files_round_trip(tmp_path: Path) -> None:
    records = [Record(id=f"é-{i}", instruction=f"q {i}") for i in range(30)]
    assert ListSource(records).digest() == stable_hash([r.id for r in records])
    writer = RecordWriter(tmp_path / "records.jsonl", "test")
    for r in records:
        writer.write(r)
    source = writer.close()
    assert len(source) == 30 and source.load() == records and source.digest() == ListSource(records).digest()
    assert len(JsonlSource(tmp_path / "records.jsonl")) == 30


def test_the_record_writer_refuses_a_repeated_id_and_leaves_no_file(tmp_path: Path) -> None:
    writer = RecordWriter(tmp_path / "records.jsonl", "stage x outputs")
    writer.write(Record(id="a", instruction="1"))
    with pytest.raises(RuntimeError, match="duplicate record id a in stage x outputs"):
        writer.write(Record(id="a", instruction="2"))
    assert not any(tmp_path.iterdir())


def test_streamed_input_matches_the_list_reader_including_repeated_rows(tmp_path: Path) -> None:
    rows = questions(20) + questions(5) + questions(2)  # repeated rows get numbered ids
    path = write_rows(tmp_path / "in.jsonl", rows)
    streamed = list(iter_records(path))
    assert streamed == read_records(path)
    assert len({r.id for r in streamed}) == 27
    assert list(iter_records(path, limit=7)) == streamed[:7]


# ----------------------------------------------------------------------------- a map stage streams its input

IN_FLIGHT: dict[str, int] = {"read": 0, "done": 0, "max": 0}


class CountingConfig(StageConfig):
    type: Literal["test.counting"] = "test.counting"


class Counting(MapStage[CountingConfig]):
    """Records how many input records had been read but not finished, at most, while the stage ran."""

    Config = CountingConfig

    async def process(self, record: Record) -> list[Record]:
        IN_FLIGHT["max"] = max(IN_FLIGHT["max"], IN_FLIGHT["read"] - IN_FLIGHT["done"])
        IN_FLIGHT["done"] += 1
        return [record.model_copy(update={"response": "ok"})]


def test_a_map_stage_reads_its_input_as_it_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datatailor.runner as runner
    from datatailor.stages import STAGES, load_all

    load_all()
    monkeypatch.setitem(STAGES, "test.counting", Counting)  # registered for this test only (not in the docs)
    monkeypatch.setattr(Counting, "type_name", "test.counting", raising=False)

    real = runner.iter_records
    reading = {"on": False}

    def counted(*args: Any, **kwargs: Any):
        IN_FLIGHT["read"] = 0  # each pass over the input starts again; the last one feeds the workers
        for r in real(*args, **kwargs):
            if reading["on"]:
                IN_FLIGHT["read"] += 1
            yield r

    monkeypatch.setattr(runner, "iter_records", counted)
    original_run_map = runner.Runner._run_map

    async def run_map(self, stage, cp, inputs):  # count only the pass that feeds the workers
        reading["on"] = True
        try:
            return await original_run_map(self, stage, cp, inputs)
        finally:
            reading["on"] = False

    monkeypatch.setattr(runner.Runner, "_run_map", run_map)
    IN_FLIGHT.update(read=0, done=0, max=0)
    result = run(make_recipe(tmp_path, [{"type": "test.counting", "concurrency": 4}], rows=questions(400)), tmp_path / "out")
    assert result.status == "complete" and result.records == 400
    # the feeding pass keeps a queue of 2 × 4 records plus the 4 in the workers (a list would hold all 400)
    assert IN_FLIGHT["done"] == 400
    assert IN_FLIGHT["max"] <= 3 * 4 + 1, IN_FLIGHT
    assert [r["instruction"] for r in read_jsonl(tmp_path / "out/data.jsonl")] == [q["instruction"] for q in questions(400)]
