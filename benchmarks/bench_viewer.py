"""`datatailor view` on large runs: time to the first page, index build time, and the server's memory.

1. Make a run directory of N input records: by default with the real runner (`--source runner`): a recipe of
   `respond` (a scripted writer whose answers vary in length and wording, some of them empty, which fail), a
   scripted `quality.rate` and `dedup` on the responses (a share of near-identical answers are dropped) — the files
   are exactly what `datatailor run` writes. `--source synthetic` writes the same layout directly (data.jsonl,
   failures.jsonl, each stage's records.jsonl, manifest, usage), for sizes where running the runner takes too long.
2. Start `datatailor view RUN --port 0` in a subprocess with a fresh index folder, and time: the address printed,
   the first records page served (HTTP 200 with rows), the index complete. The server's RSS is sampled every 0.1 s
   from /proc; its peak (VmHWM) is read from the kernel at the end.
3. With the index built: the median of 5 of a few page loads (page 1, a deep page, a full-text search for a common
   and a rare word, a stage filter, a quality range, the failures page, one record).
4. Restart the server on the built index: time to the first page.

    python benchmarks/bench_viewer.py --records 200000
    python benchmarks/bench_viewer.py --records 1000000 --source synthetic
    python benchmarks/bench_viewer.py --records 20000 --keep /tmp/run20k    # keep (and reuse) the run directory

A fresh request cache (DATATAILOR_CACHE_DIR in a temporary folder) for the runner and the viewer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORDS = ("river mountain city number letter colour planet animal recipe poem story law market engine garden bridge music "
         "winter ocean forest theory history language machine island desert signal window harvest copper lantern meadow "
         "orbit glacier pepper violin canyon ledger compass falcon velvet quarry tundra").split()


# ----------------------------------------------------------------------------- the scripted models (runner source)


def _rng(text: str) -> random.Random:
    return random.Random(int(hashlib.blake2b(text.encode(), digest_size=8).hexdigest(), 16))


def answer_text(instruction: str, words: tuple[int, int] = (20, 220)) -> str:
    """A deterministic answer of 20-220 words; every 37th is empty (a failure), every 9th nearly repeats another."""
    rng = _rng(instruction)
    n = int(re.search(r"Task (\d+)", instruction)[1]) if re.search(r"Task (\d+)", instruction) else 0
    if n % 37 == 5:
        return ""
    if n % 9 == 4:  # a near copy of a stock answer: dedup drops most of these
        return "The short answer is that it depends on the context, the budget and the people involved in the work."
    chosen = [rng.choice(WORDS) for _ in range(rng.randint(*words))]
    return " ".join(chosen).capitalize() + "."


def writer(request: Any) -> str:
    return answer_text(request.variables["instruction"])


def rater(request: Any) -> str:
    return f"Score: {_rng(request.variables.get('response') or '').randint(1, 5)}"


def write_input(path: Path, n: int) -> None:
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"instruction": f"Task {i}: explain how the {rng.choice(WORDS)} relates to the "
                                                f"{rng.choice(WORDS)} in {rng.choice(WORDS)} terms, for reader {rng.randrange(10**6)}."}) + "\n")


def make_with_runner(folder: Path, n: int) -> Path:
    import yaml

    from datatailor.recipe import load_recipe
    from datatailor.runner import run_recipe_sync

    folder.mkdir(parents=True, exist_ok=True)
    write_input(folder / "input.jsonl", n)
    recipe = {
        "name": f"viewer-bench-{n}",
        "models": {"strong": {"backend": "scripted", "model": "writer", "handler": "bench_viewer:writer", "max_concurrency": 256},
                   "judge": {"backend": "scripted", "model": "rater", "handler": "bench_viewer:rater", "max_concurrency": 256}},
        "input": "input.jsonl",
        "stages": [{"type": "respond", "role": "strong", "concurrency": 128},
                   {"type": "quality.rate", "role": "judge", "concurrency": 128},
                   {"type": "dedup", "compare": "response", "near": False}],
        "cache": False,
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    sys.path.insert(0, str(Path(__file__).parent))
    out = folder / "run"
    started = time.perf_counter()
    result = run_recipe_sync(load_recipe(folder / "recipe.yaml"), out, show_progress=False)
    print(f"  runner: {result.status}, {result.records:,} kept, {result.failures:,} failed, {time.perf_counter() - started:.1f} s")
    return out


# ----------------------------------------------------------------------------- the synthetic source


RECORD = ('{{"id": "{id}", "instruction": {instruction}, "input": "", "response": {response}, "metadata": {metadata}, '
          '"parents": [], "lineage": [{lineage}]}}')
RESPONDED = ('{{"stage": "respond", "role": "strong", "model": "writer", "template_hash": "c97be4eaa78895fa", "prompt_tokens": {p}, '
             '"completion_tokens": {c}, "cost_usd": 0.0, "decision": null, "reason": null, "details": {{}}}}')
RATED = ('{{"stage": "quality.rate", "role": "judge", "model": "rater", "template_hash": "23839235922c9df0", "prompt_tokens": {p}, '
         '"completion_tokens": 3, "cost_usd": 0.0, "decision": "rated", "reason": "score {s}", "details": {{"score": {s}.0, '
         '"reply": "Score: {s}"}}}}')
KEPT = ('{"stage": "dedup", "role": null, "model": null, "template_hash": null, "prompt_tokens": 0, "completion_tokens": 0, '
        '"cost_usd": 0.0, "decision": "kept", "reason": "no earlier duplicate", "details": {}}')


def make_synthetic(folder: Path, n: int, words: tuple[int, int] = (20, 220), stage_records: bool = True) -> Path:
    """The run directory the recipe above would write, written directly (same files, same record shape: the lines
    are formatted from templates, which is several times quicker than json.dumps of each record). `words`: the
    range of an answer's length; `stage_records=False` leaves the stages' records.jsonl empty (the final files are
    what the viewer reads; tests/test_viewer_scale.py writes short answers and no stage copies, to be quick)."""
    from datatailor.io import write_json
    from datatailor.records import stable_hash

    out = folder / "run"
    dirs = [out / "stages" / f"{i:02d}-{name}" for i, name in enumerate(("respond", "quality.rate", "dedup"))]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    files = {"data": (out / "data.jsonl").open("w", encoding="utf-8"), "fail": (out / "failures.jsonl").open("w", encoding="utf-8")}
    stage_files = [(d / "records.jsonl").open("w", encoding="utf-8") if stage_records else open(os.devnull, "w") for d in dirs]
    counts = {"kept": 0, "empty": 0, "dup": 0}
    stock_seen = False
    for i in range(n):
        instruction = (f"Task {i}: explain how the {rng.choice(WORDS)} relates to the {rng.choice(WORDS)} in "
                       f"{rng.choice(WORDS)} terms, for reader {rng.randrange(10**6)}.")
        rid = stable_hash(instruction, "")
        response = answer_text(instruction, words)
        quoted = json.dumps(instruction)
        if not response:
            record = RECORD.format(id=rid, instruction=quoted, response="null", metadata="{}", lineage="")
            files["fail"].write(f'{{"id": "{rid}", "stage": "respond", "kind": "empty_response", '
                                f'"message": "strong (writer) returned an empty answer", "record": {record}}}\n')
            counts["empty"] += 1
            continue
        answer = json.dumps(response)
        responded = RESPONDED.format(p=20 + len(instruction) // 4, c=len(response) // 4)
        stage_files[0].write(RECORD.format(id=rid, instruction=quoted, response=answer, metadata="{}", lineage=responded) + "\n")
        score = int(hashlib.blake2b(response.encode(), digest_size=2).hexdigest(), 16) % 5 + 1
        lineage = f"{responded}, {RATED.format(p=80 + len(response) // 4, s=score)}"
        rated = RECORD.format(id=rid, instruction=quoted, response=answer, metadata=f'{{"quality": {score}.0}}', lineage=lineage)
        stage_files[1].write(rated + "\n")
        if response.startswith("The short answer") and stock_seen:
            files["fail"].write(f'{{"id": "{rid}", "stage": "dedup", "kind": "duplicate", '
                                f'"message": "exact duplicate of an earlier record", "record": {rated}}}\n')
            counts["dup"] += 1
            continue
        stock_seen = stock_seen or response.startswith("The short answer")
        line = RECORD.format(id=rid, instruction=quoted, response=answer, metadata=f'{{"quality": {score}.0}}',
                             lineage=f"{lineage}, {KEPT}") + "\n"
        stage_files[2].write(line)
        files["data"].write(line)
        counts["kept"] += 1
    for fh in [*files.values(), *stage_files]:
        fh.close()
    kept, failed = counts["kept"], counts["empty"] + counts["dup"]
    summaries = [
        {"name": "respond", "type": "respond", "method": None, "inputs": n, "outputs": n - counts["empty"], "failures": counts["empty"],
         "failure_kinds": {"empty_response": counts["empty"]}, "rounds": 1, "complete": True, "artifacts": []},
        {"name": "quality.rate", "type": "quality.rate", "method": None, "inputs": n - counts["empty"], "outputs": n - counts["empty"],
         "failures": 0, "failure_kinds": {}, "rounds": 1, "complete": True, "artifacts": []},
        {"name": "dedup", "type": "dedup", "method": None, "inputs": n - counts["empty"], "outputs": kept, "failures": counts["dup"],
         "failure_kinds": {"duplicate": counts["dup"]}, "rounds": 1, "complete": True, "artifacts": []},
    ]
    for d, summary in zip(dirs, summaries):
        (d / "outputs.jsonl").touch()
        (d / "failures.jsonl").touch()
        write_json(d / "done.json", {"digest": "synthetic", "records_digest": "synthetic", **summary})
    write_json(out / "recipe.json", {"name": f"viewer-bench-{n}", "models": {}, "stages": [
        {"type": "respond", "name": None}, {"type": "quality.rate", "name": None, "key": "quality"}, {"type": "dedup", "name": None}]})
    write_json(out / "manifest.json", {"recipe_name": f"viewer-bench-{n}", "recipe_hash": "synthetic", "status": "complete",
                                       "message": "", "stages": summaries, "invocations": 1})
    write_json(out / "usage.json", {"run": {}, "total": {}})
    print(f"  synthetic: {kept:,} kept, {failed:,} failed")
    return out


# ----------------------------------------------------------------------------- measuring the server


def get(url: str, timeout: float = 60.0) -> tuple[int, str, float]:
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            body = reply.read().decode("utf-8")
            return reply.status, body, time.perf_counter() - started
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace"), time.perf_counter() - started


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Server:
    """`datatailor view RUN --port 0` in a subprocess; its address, and its RSS sampled in a thread."""

    def __init__(self, run: Path, index_dir: Path, env: dict[str, str]):
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "datatailor", "view", str(run), "--port", "0", "--index-dir", str(index_dir)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        if not m:
            raise SystemExit(f"the viewer did not start: {line}{self.proc.stderr.read() if self.proc.stderr else ''}")
        self.url = m.group(1)
        self.listening_s = time.perf_counter() - self.started
        self.samples: list[float] = []
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.samples.append(rss_mb(self.proc.pid))
            except FileNotFoundError:
                return

    def peak_mb(self) -> float:
        return rss_mb(self.proc.pid, "VmHWM")

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def first_page(server: Server, key: str, timeout: float = 600) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, body, _ = get(f"{server.url}run/{key}/records")
        if status == 200 and 'class="status-' in body and "<td><a href=" in body:
            return time.perf_counter() - server.started
        time.sleep(0.05)
    raise SystemExit("no records page within the timeout")


def wait_index(server: Server, key: str, timeout: float = 7200) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, body, _ = get(f"{server.url}api/run/{key}/status")
        if status == 200 and json.loads(body)["index"]["phase"] == "ready":
            return time.perf_counter() - server.started
        if status == 200 and json.loads(body)["index"]["phase"] == "error":
            raise SystemExit(f"indexing failed: {body}")
        time.sleep(0.2)
    raise SystemExit("the index was not built within the timeout")


def median_time(url: str, repeat: int = 5) -> tuple[float, int]:
    times, status = [], 0
    for _ in range(repeat):
        status, _, t = get(url)
        times.append(t)
    return statistics.median(times), status


def measure(run: Path, work: Path, env: dict[str, str]) -> dict[str, Any]:
    index_dir = work / "index"
    shutil.rmtree(index_dir, ignore_errors=True)
    server = Server(run, index_dir, env)
    with urllib.request.urlopen(server.url, timeout=60) as reply:  # one run: the start page redirects to it
        key = reply.url.rstrip("/").rsplit("/", 1)[1]
    out: dict[str, Any] = {"listening_s": server.listening_s}
    try:
        out["first_page_s"] = first_page(server, key)
        out["rss_at_first_page_mb"] = rss_mb(server.proc.pid)
        out["index_ready_s"] = wait_index(server, key)
        out["peak_rss_mb"] = server.peak_mb()
        out["max_sampled_rss_mb"] = max(server.samples or [0.0])
        status, body, _ = get(f"{server.url}run/{key}/records?status=all")
        some_id = re.search(r"/record/([0-9a-f]{16})", body)[1]
        pages = {
            "records page 1": f"run/{key}/records",
            "records page 2,000": f"run/{key}/records?page=2000",
            "search, common word": f"run/{key}/records?q=river",
            "search, rare word": f"run/{key}/records?q=reader+424242",
            "filter: quality 4-5": f"run/{key}/records?qmin=4&qmax=5",
            "filter: failed, kind duplicate": f"run/{key}/records?kind=duplicate",
            "sort: longest response": f"run/{key}/records?sort=-length",
            "failures by kind": f"run/{key}/failures",
            "one record": f"run/{key}/record/{some_id}",
            "run overview": f"run/{key}",
        }
        out["pages"] = {}
        for name, path in pages.items():
            t, status = median_time(server.url + path)
            out["pages"][name] = {"median_s": t, "status": status}
        out["peak_rss_after_pages_mb"] = server.peak_mb()
        out["index_mb"] = sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file()) / 2**20
    finally:
        server.stop()
    warm = Server(run, index_dir, env)
    try:
        out["warm_first_page_s"] = first_page(warm, key)
        out["warm_peak_rss_mb"] = warm.peak_mb()
    finally:
        warm.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000, help="input records of the run")
    parser.add_argument("--source", choices=("runner", "synthetic"), default="runner")
    parser.add_argument("--keep", type=Path, help="make the run in this folder and keep it; reuse it if it is there")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-viewer-"))
    env = dict(os.environ, DATATAILOR_CACHE_DIR=str(work / "cache"), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH", "")])))
    os.environ["DATATAILOR_CACHE_DIR"] = env["DATATAILOR_CACHE_DIR"]
    folder = args.keep or work / "made"
    run = folder / "run"
    try:
        if not (run / "manifest.json").is_file():
            print(f"making a {args.records:,}-record run ({args.source}) in {folder}")
            started = time.perf_counter()
            run = (make_with_runner if args.source == "runner" else make_synthetic)(folder, args.records)
            print(f"  made in {time.perf_counter() - started:.1f} s")
        size = sum(p.stat().st_size for p in run.rglob("*.jsonl")) / 2**20
        data_lines = sum(1 for _ in (run / "data.jsonl").open("rb"))
        fail_lines = sum(1 for _ in (run / "failures.jsonl").open("rb"))
        print(f"run: {run} ({data_lines:,} kept + {fail_lines:,} failed records; {size:,.0f} MB of JSONL)")
        load = os.getloadavg()[0]
        figures = measure(run, work, env)
        figures.update(records=args.records, kept=data_lines, failed=fail_lines, jsonl_mb=round(size), load_before=load,
                       load_after=os.getloadavg()[0], source=args.source)
        print(f"load average before / after: {load:.1f} / {figures['load_after']:.1f} ({os.cpu_count()} CPUs)")
        print(f"address printed after        {figures['listening_s']:.2f} s")
        print(f"first records page after     {figures['first_page_s']:.2f} s  (RSS then {figures['rss_at_first_page_mb']:.0f} MB)")
        print(f"index complete after         {figures['index_ready_s']:.1f} s  ({figures['index_mb']:.0f} MB on disk)")
        print(f"server peak RSS (VmHWM)      {figures['peak_rss_mb']:.0f} MB during the build, {figures['peak_rss_after_pages_mb']:.0f} MB after the pages below")
        print(f"restart on the built index:  first page after {figures['warm_first_page_s']:.2f} s, peak RSS {figures['warm_peak_rss_mb']:.0f} MB")
        print("page loads with the index built (median of 5):")
        for name, p in figures["pages"].items():
            print(f"  {name:32s} {1000 * p['median_s']:8.0f} ms  (HTTP {p['status']})")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
