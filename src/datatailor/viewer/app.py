"""The viewer's web app: Starlette routes rendering Jinja2 pages (server-side; a little vanilla JS for flags and
live updates). Every page reads the run's files and index as they are now; nothing but `flags.jsonl` is written.

Pages: `/` (what is open), `/run/K` (status, stages, usage, recipe), `/run/K/records` (table, search, filters),
`/run/K/record/ID` (lineage and evidence), `/run/K/failures`, `/compare?a=K&b=K`, `/compare/record/ID`,
`/bakeoff/K` (the table) and `/bakeoff/K/cell/METHOD/TESTSET` (judged items). JSON: `/api/run/K/status`,
`POST /api/run/K/flag`.
"""

from __future__ import annotations

import contextlib
import json
import mimetypes
import sys
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jinja2
import yaml
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from datatailor import __version__
from datatailor.errors import UserError
from datatailor.report.svg import bar_chart, empty_chart, nice_top
from datatailor.stages.contract import METHODS
from datatailor.stages.flags import CLEAR, VERDICTS
from datatailor.viewer import compare as cmp
from datatailor.viewer.evidence import other_metadata, sections, timeline, word_diff
from datatailor.viewer.folders import RunFolder, status_line
from datatailor.viewer.index import FAILED
from datatailor.viewer.query import Filters, failure_groups, locate, records_page
from datatailor.viewer.registry import Registry, RunEntry

HERE = Path(__file__).parent
SERVED_SUFFIXES = (".html", ".json", ".md", ".csv", ".png", ".svg", ".txt")
CELL_PER_PAGE = 20


class _Undefined(jinja2.StrictUndefined):
    """A missing value is false in a test (`{% if manifest.shortfall %}`), and an error anywhere else: a typo in a
    template fails loudly instead of printing nothing."""

    def __bool__(self) -> bool:
        return False


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=_Undefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v, digits=2: "–" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:,.{digits}f}")
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f} %"
    env.filters["money"] = lambda v: "–" if v is None else f"${v:,.4f}"
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, ensure_ascii=False, indent=1)
    env.globals.update(version=__version__, methods=METHODS, verdicts=VERDICTS)
    return env


class ViewerApp:
    """The routes over one `Registry` of folders."""

    def __init__(self, registry: Registry, *, allow_flags: bool = True):
        self.registry = registry
        self.allow_flags = allow_flags
        self.env = _environment()

    # -- helpers ------------------------------------------------------------------------------------------

    def page(self, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("registry", self.registry)
        context.setdefault("entry", None)
        context.setdefault("title", "datatailor view")
        return HTMLResponse(self.env.get_template(template).render(**context), status_code=status_code)

    def entry(self, request: Request) -> RunEntry:
        entry = self.registry.run(request.path_params["key"])
        if entry is None:
            raise HTTPException(404, f"no run {request.path_params['key']!r} is open in this viewer")
        return entry

    def run_context(self, entry: RunEntry) -> dict[str, Any]:
        """What every page of a run shows at the top: its status, the index's progress, problems with its files."""
        folder = entry.folder()
        flags = entry.flags.current()
        return {"entry": entry, "folder": folder, "status_line": status_line(folder), "index": entry.index.state,
                "flags": flags, "flag_error": entry.flags.error, "allow_flags": self.allow_flags,
                "title": f"{entry.label} — datatailor view"}

    # -- pages ----------------------------------------------------------------------------------------------

    def home(self, request: Request) -> Response:
        order = self.registry.order
        if len(order) == 1:
            kind, key = order[0]
            return RedirectResponse(f"/{kind}/{key}", status_code=307)
        return self.page("home.html", runs=self.registry.top_runs(), bakeoffs=list(self.registry.bakeoffs.values()))

    def run(self, request: Request) -> Response:
        entry = self.entry(request)
        ctx = self.run_context(entry)
        folder: RunFolder = ctx["folder"]
        conn = entry.index.connect()
        try:
            lines = entry.index.file_lines(conn)
        finally:
            conn.close()
        stages = []
        for stage in folder.stages():
            counts = stage.counts
            live = None
            if not stage.complete:
                live = {"outputs": lines.get(str(stage.folder / "outputs.jsonl")), "failures": lines.get(str(stage.folder / "failures.jsonl"))}
            stages.append({"info": stage, "counts": counts, "live": live, "method": counts.get("method")})
        usage = folder.usage()
        recipe = folder.recipe()
        total = usage.get("total") or {}
        roles = {**(total.get("roles") or {}), **({"all roles": total["all"]} if total.get("all") else {})}
        return self.page("run.html", **ctx, stages=stages, usage=total, usage_run=usage.get("run") or {}, usage_roles=roles,
                         recipe_yaml=yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True) if recipe else "",
                         reports=folder.reports(), manifest=folder.manifest)

    def records(self, request: Request) -> Response:
        entry = self.entry(request)
        ctx = self.run_context(entry)
        filters = Filters.from_params(request.query_params)
        page = records_page(entry.index, filters, ctx["flags"])
        keys = page.facets.get("keys", {})
        stages = sorted({k.split("|")[1] for k in keys if k.split("|")[1]})
        kinds = sorted({k.split("|")[2] for k in keys if k.split("|")[0] == FAILED})
        return self.page("records.html", **ctx, filters=filters, page=page, stage_choices=stages, kind_choices=kinds,
                         method_choices=sorted(page.facets.get("methods", {})))

    def record(self, request: Request) -> Response:
        entry = self.entry(request)
        ctx = self.run_context(entry)
        rid = request.path_params["rid"]
        located = [x for x in locate(entry.index, rid) if x.row is not None]
        if not located:
            return self.page("error.html", 404, **ctx, message=f"no record {rid} in this run (yet)")
        at = request.query_params.get("at")
        chosen = next((x for x in located if str(x.rowid) == at), located[0])
        failure = chosen.row if chosen.status == FAILED else None
        record = (chosen.row or {}).get("record") if failure else chosen.row
        record = record if isinstance(record, dict) else {"id": rid}
        folder: RunFolder = ctx["folder"]
        judges = {str(s.get("output") or "metadata.judge"): (str(s.get("question") or "prompt"), str(s.get("a") or "response"),
                                                             str(s.get("b") or "metadata.reference"))
                  for s in folder.recipe().get("stages") or [] if s.get("type") == "judge.pairwise"}
        found = sections(record, folder.quality_keys(), judges)
        shown = {"codec", "refed", "coach", "teams_rl", "evol", *folder.quality_keys()}
        if any(s.kind == "judge" for s in found):  # the judge's output and both answers are drawn by its section
            shown |= {f.split(".")[1] for out, spec in judges.items() for f in (out, *spec) if f.startswith("metadata.")}
            shown |= {"judge", "reference"}
        parents_here = {p for p in record.get("parents") or [] if any(x.row is not None for x in locate(entry.index, p))}
        return self.page("record.html", **ctx, record=record, failure=failure, chosen=chosen, located=located, parents_here=parents_here,
                         sections=found, timeline=timeline(record), other=other_metadata(record, shown),
                         quality=[(k, v) for k in folder.quality_keys()
                                  if isinstance(v := (record.get("metadata") or {}).get(k), (int, float))],
                         flag=ctx["flags"].get(rid))

    def failures(self, request: Request) -> Response:
        entry = self.entry(request)
        ctx = self.run_context(entry)
        groups = failure_groups(entry.index)
        return self.page("failures.html", **ctx, groups=groups, total=sum(g["count"] for g in groups))

    def run_file(self, request: Request) -> Response:
        """A report or artifact the run wrote (inside the run directory only)."""
        entry = self.entry(request)
        path = (entry.path / request.path_params["path"]).resolve()
        if not path.is_relative_to(entry.path) or path.suffix not in SERVED_SUFFIXES or not path.is_file():
            raise HTTPException(404, "no such report in this run")
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "text/plain")

    def compare(self, request: Request) -> Response:
        runs = list(self.registry.runs.values())
        a, b = self._pair_of(request)
        if a is None or b is None:
            return self.page("compare.html", runs=runs, a=a, b=b, title="compare — datatailor view")
        indexes = {"A": a.index, "B": b.index}
        charts = []
        for hist_id, hist, caption in (
            ("fig-length", cmp.length_histogram(indexes), "Response length in words: share of each run's kept records."),
            ("fig-quality", cmp.quality_histogram(indexes), "Quality score (rated records only): share per half point."),
            ("fig-distinct2", cmp.distinct2_histogram(indexes), "Distinct-2 of each response (unique / all word bigrams)."),
        ):
            label = caption.split(":")[0].split(" (")[0]
            peak = max((v for _, vs in hist.series for v in vs if v is not None), default=0.0)
            svg = (bar_chart(label, hist.labels, hist.series, y_max=min(1.0, nice_top(peak)), fmt=lambda v: f"{100 * v:.0f} %", legend=True)
                   if hist.labels and any(hist.counts.values()) else empty_chart(label, "no values in either run"))
            charts.append({"id": hist_id, "svg": svg, "caption": caption, "counts": hist.counts})
        try:
            page = max(1, int(request.query_params.get("page", "1")))
        except ValueError:
            page = 1
        only_different = request.query_params.get("different") == "1"
        pairs, more = cmp.common_ids(a.index, b.index, page, only_different)
        return self.page("compare.html", runs=runs, a=a, b=b, charts=charts, pairs=pairs, more=more, page=page,
                         only_different=only_different, overlap=cmp.overlap(a.index, b.index),
                         distinct={a.key: cmp.corpus_distinct(a.index), b.key: cmp.corpus_distinct(b.index)},
                         title="compare — datatailor view")

    def compare_record(self, request: Request) -> Response:
        a, b = self._pair_of(request)
        if a is None or b is None:
            raise HTTPException(400, "give two runs: ?a=KEY&b=KEY")
        rid = request.path_params["rid"]
        left = next((x for x in locate(a.index, rid) if x.row is not None), None)
        right = next((x for x in locate(b.index, rid) if x.row is not None), None)
        rec = lambda x: None if x is None else (x.row.get("record") if x.status == FAILED else x.row)  # noqa: E731
        ra, rb = rec(left), rec(right)
        diffs = {f: word_diff((ra or {}).get(f) or "", (rb or {}).get(f) or "") for f in ("instruction", "input", "response")}
        return self.page("compare_record.html", a=a, b=b, rid=rid, left=left, right=right, ra=ra, rb=rb, diffs=diffs,
                         title=f"{rid} in two runs — datatailor view")

    def _pair_of(self, request: Request) -> tuple[RunEntry | None, RunEntry | None]:
        tops = self.registry.top_runs()
        a_key = request.query_params.get("a") or (tops[0].key if len(tops) >= 2 else None)
        b_key = request.query_params.get("b") or (tops[1].key if len(tops) >= 2 else None)
        a = self.registry.run(a_key) if a_key else None
        b = self.registry.run(b_key) if b_key else None
        if (a_key and a is None) or (b_key and b is None):
            raise HTTPException(404, "no such run open in this viewer")
        return a, b

    def bakeoff(self, request: Request) -> Response:
        entry = self.registry.bakeoffs.get(request.path_params["key"])
        if entry is None:
            raise HTTPException(404, "no such bake-off open in this viewer")
        self.registry.refresh_bakeoff(entry)
        report = entry.folder.report()
        return self.page("bakeoff.html", bakeoff=entry, rows=entry.folder.rows(), testsets=entry.folder.testsets(),
                         report=report, config=entry.folder.config(), title=f"{entry.label} — bake-off — datatailor view")

    def bakeoff_report(self, request: Request) -> Response:
        entry = self.registry.bakeoffs.get(request.path_params["key"])
        path = entry.path / "bakeoff_report.html" if entry is not None else None
        if path is None or not path.is_file():
            raise HTTPException(404, "this bake-off has no report yet")
        return FileResponse(path, media_type="text/html")

    def cell(self, request: Request) -> Response:
        entry = self.registry.bakeoffs.get(request.path_params["key"])
        if entry is None:
            raise HTTPException(404, "no such bake-off open in this viewer")
        self.registry.refresh_bakeoff(entry)
        method, testset = request.path_params["method"], request.path_params["testset"]
        cell = entry.folder.cell(method, testset)
        run_key = entry.runs.get((method, testset))
        run = self.registry.run(run_key) if run_key else None
        if cell is None or run is None:
            raise HTTPException(404, f"no evaluation of {method} on {testset} yet")
        filters = Filters.from_params({**request.query_params, "status": request.query_params.get("status", "all")})
        page = records_page(run.index, filters, {}, per_page=CELL_PER_PAGE)
        items = []
        for row in page.rows:
            found = [x for x in locate(run.index, row.id) if x.row is not None]
            if not found:
                continue
            x = found[0]
            record = x.row.get("record") if x.status == FAILED else x.row
            judged = sections(record or {}, [], {"metadata.judge": ("prompt", "response", "metadata.reference")})
            items.append({"row": row, "record": record or {}, "judge": judged[0] if judged else None,
                          "failure": x.row if x.status == FAILED else None})
        return self.page("cell.html", bakeoff=entry, cell=cell, run=run, filters=filters, page=page, items=items,
                         index=run.index.state, title=f"{method} on {testset} — datatailor view")

    # -- JSON -----------------------------------------------------------------------------------------------

    def api_status(self, request: Request) -> Response:
        entry = self.entry(request)
        folder = entry.folder()
        state = entry.index.state
        conn = entry.index.connect()
        try:
            lines = entry.index.file_lines(conn)
        finally:
            conn.close()
        stages = [{"name": s.name, "complete": s.complete, **{k: s.counts.get(k) for k in ("inputs", "outputs", "failures")},
                   "live_outputs": lines.get(str(s.folder / "outputs.jsonl")), "live_failures": lines.get(str(s.folder / "failures.jsonl"))}
                  for s in folder.stages()]
        return JSONResponse({"status": folder.status, "status_line": status_line(folder), "stages": stages,
                             "index": {"phase": state.phase, "share": round(state.share, 4), "rows": state.rows,
                                       "version": state.version, "error": state.error}})

    async def api_flag(self, request: Request) -> Response:
        entry = self.entry(request)
        if not self.allow_flags:
            return JSONResponse({"error": "this viewer was started with --no-flags (read-only)"}, status_code=403)
        # A custom header and a JSON body: a page on another site cannot send this without a CORS preflight we refuse.
        if request.headers.get("x-datatailor-view") != "1" or "application/json" not in request.headers.get("content-type", ""):
            return JSONResponse({"error": "flags are set from the viewer's own pages"}, status_code=400)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        rid, flag, note = body.get("id"), body.get("flag"), str(body.get("note") or "")[:2000]
        if not isinstance(rid, str) or flag not in (*VERDICTS, CLEAR):
            return JSONResponse({"error": f"give an id and a flag ({', '.join(VERDICTS)} or {CLEAR})"}, status_code=400)
        row = entry.flags.set(rid, flag, note)
        return JSONResponse({"ok": True, "flag": row, "file": str(entry.flags.path)})


def create_app(registry: Registry, *, allow_flags: bool = True, allowed_hosts: list[str] | None = None) -> Starlette:
    """The Starlette app over `registry` (the caller starts and stops the indexes through it)."""
    viewer = ViewerApp(registry, allow_flags=allow_flags)

    async def http_error(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else str(exc)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": detail}, status_code=code)
        return viewer.page("error.html", code, message=detail)

    async def user_error(request: Request, exc: Exception) -> Response:
        return await http_error(request, HTTPException(422, str(exc)))

    async def bug(request: Request, exc: Exception) -> Response:
        traceback.print_exception(exc, file=sys.stderr)  # the page says what failed; the terminal has where
        return await http_error(request, HTTPException(500, f"the viewer failed on this page: {type(exc).__name__}: {exc}"))

    routes = [
        Route("/", viewer.home),
        Route("/run/{key}", viewer.run),
        Route("/run/{key}/records", viewer.records),
        Route("/run/{key}/record/{rid}", viewer.record),
        Route("/run/{key}/failures", viewer.failures),
        Route("/run/{key}/file/{path:path}", viewer.run_file),
        Route("/compare", viewer.compare),
        Route("/compare/record/{rid}", viewer.compare_record),
        Route("/bakeoff/{key}", viewer.bakeoff),
        Route("/bakeoff/{key}/report", viewer.bakeoff_report),
        Route("/bakeoff/{key}/cell/{method}/{testset}", viewer.cell),
        Route("/api/run/{key}/status", viewer.api_status),
        Route("/api/run/{key}/flag", viewer.api_flag, methods=["POST"]),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["127.0.0.1", "localhost"])]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            registry.close()  # the index threads stop; what they committed stays for the next start

    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, UserError: user_error, Exception: bug})
