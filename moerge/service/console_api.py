"""The JSON endpoints the web console needs beyond the OpenAI and pool APIs: what a key may do,
the pool with sizes and usage, the engine's state, key metrics and the evaluation reports.
`add_console` also serves the console's static pages under /ui."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from moerge.experts.errors import ExpertError
from moerge.service import reports as eval_reports
from moerge.service.ops import KeyCheck, Metrics

UI_DIR = Path(__file__).parent / "ui"
PAGES = ("pool", "playground", "evaluation", "health")
# The shells load only files from this origin; the header makes the browser refuse anything else.
UI_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
          "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


class _UnknownPage(ExpertError):
    status = 404


def _samples(metric, suffix: str = "") -> list[tuple[dict, float]]:
    """A Prometheus metric's samples whose name ends with `suffix`, as (labels, value)."""
    out = []
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith(suffix):
                out.append((dict(s.labels), float(s.value)))
    return out


def expert_usage(metrics: Metrics) -> dict[str, int]:
    """Requests routed to each expert since the service started ("(base)" when routing abstained)."""
    return {labels["expert"]: int(v) for labels, v in _samples(metrics.expert_use, "_total")}


def key_metrics(metrics: Metrics, started: float) -> dict:
    requests: dict[str, int] = {}
    for labels, v in _samples(metrics.requests, "_total"):
        cls = labels["status"][:1] + "xx"
        requests[cls] = requests.get(cls, 0) + int(v)
    tokens = {labels["kind"]: int(v) for labels, v in _samples(metrics.tokens, "_total")}
    counts = {labels["method"]: v for labels, v in _samples(metrics.routing, "_count")}
    sums = {labels["method"]: v for labels, v in _samples(metrics.routing, "_sum")}
    routing = {m: {"requests": int(n), "mean_ms": round(1000 * sums.get(m, 0.0) / n, 3) if n else None}
               for m, n in counts.items()}
    return {"uptime_seconds": round(time.time() - started, 1), "requests": requests,
            "requests_total": sum(requests.values()), "tokens": tokens, "routing": routing,
            "experts": expert_usage(metrics)}


def _describe(executor) -> dict:
    out = {"name": getattr(executor, "name", type(executor).__name__), "state": None}
    describe = getattr(executor, "describe", None)
    if callable(describe):
        try:
            out["state"] = describe()
        except Exception as e:  # noqa: BLE001 - a broken describe() must not take the health page down
            out["state_error"] = f"{type(e).__name__}: {e}"
    return out


def engine_state(runtime) -> dict:
    """Readiness plus what every engine says about itself (preferred first); no figure is made up here."""
    ready, detail = runtime.readiness()
    system = getattr(runtime, "system", None)
    local = list(getattr(system, "local", None) or [runtime.executor])
    remote = getattr(system, "remote", None)
    engines = [{"role": "preferred" if i == 0 else "fallback", **_describe(ex)} for i, ex in enumerate(local)]
    if remote is not None:
        engines.append({"role": "remote models", **_describe(remote)})
    return {"executor": engines[0]["name"], "ready": ready, "readiness": detail, "engines": engines}


def _artifact_bytes(pool, card) -> int | None:
    total = 0
    for digest in card.artifacts.values():
        try:
            total += pool.store.size(digest)
        except (OSError, ExpertError):
            return None     # a blob went missing or the store failed: say "unknown", never a wrong size
    return total


def pool_overview(pool, usage: dict[str, int]) -> list[dict]:
    rows = []
    for card in pool.list():
        rows.append({"name": card.name, "kind": card.kind, "rank": card.rank, "description": card.description,
                     "tags": list(card.tags), "examples": list(card.examples),
                     "target_modules": list(card.target_modules), "model": card.model, "api_base": card.api_base,
                     "has_gate": "gate" in card.artifacts, "has_arrow": "arrow" in card.artifacts,
                     "size_bytes": _artifact_bytes(pool, card), "requests": usage.get(card.name, 0),
                     "created_at": card.created_at})
    return rows


def _refusal(check, header) -> str | None:
    try:
        check(header)
    except ExpertError as e:
        return e.message
    return None


def build_console_router(runtime, keys: KeyCheck, metrics: Metrics) -> APIRouter:
    api = APIRouter()
    started = time.time()

    def roots() -> list[Path]:
        return list(runtime.settings.reports_dirs)

    def user(request: Request) -> None:
        keys.user(request.headers.get("authorization"))

    @api.get("/v1/access")
    async def access(request: Request):
        """What the caller's key may do, with the API's own refusal message for what it may not."""
        header = request.headers.get("authorization")
        chat_error = _refusal(keys.user, header)
        admin_error = _refusal(keys.admin_call, header)
        return {"keys_required": bool(keys.users or keys.admin), "key_sent": keys.bearer(header) is not None,
                "chat": chat_error is None, "admin": admin_error is None,
                "chat_error": chat_error, "admin_error": admin_error}

    @api.get("/v1/pool")
    async def pool(request: Request):
        user(request)
        usage = expert_usage(metrics)
        rows = await run_in_threadpool(pool_overview, runtime.pool, usage)
        return {"object": "list", "data": rows, "base_requests": usage.get("(base)", 0)}

    @api.get("/v1/engine")
    async def engine(request: Request):
        user(request)
        return await run_in_threadpool(engine_state, runtime)

    @api.get("/v1/stats")
    async def stats(request: Request):
        user(request)
        return key_metrics(metrics, started)

    @api.get("/v1/reports")
    async def reports(request: Request):
        user(request)
        refs = await run_in_threadpool(eval_reports.find_reports, roots())
        data = await run_in_threadpool(lambda: [eval_reports.listing(r) for r in refs])
        return {"object": "list", "data": data, "folders": [str(p) for p in roots()]}

    # Declared before the {report_id:path} routes, which would otherwise swallow "compare".
    @api.get("/v1/reports/compare")
    async def compare(a: str, b: str, request: Request):
        user(request)
        return await run_in_threadpool(lambda: eval_reports.compare(eval_reports.get_report(roots(), a),
                                                                    eval_reports.get_report(roots(), b)))

    @api.get("/v1/reports/{report_id:path}/plots/{name}")
    async def plot(report_id: str, name: str, request: Request):
        user(request)
        ref = eval_reports.get_report(roots(), report_id)
        return FileResponse(eval_reports.plot_path(ref, name), media_type="image/png")

    @api.get("/v1/reports/{report_id:path}")
    async def report(report_id: str, request: Request):
        user(request)
        return await run_in_threadpool(lambda: eval_reports.summary(eval_reports.get_report(roots(), report_id)))

    return api


def add_console(app: FastAPI, runtime, keys: KeyCheck, metrics: Metrics) -> None:
    """The console's API endpoints, and its pages: public shells whose data calls carry the key."""
    app.include_router(build_console_router(runtime, keys, metrics))
    app.mount("/ui/static", StaticFiles(directory=UI_DIR / "static"), name="ui-static")
    shell = UI_DIR / "index.html"
    headers = {"Content-Security-Policy": UI_CSP, "Cache-Control": "no-cache"}

    @app.get("/ui", include_in_schema=False)
    async def ui_root():
        return RedirectResponse("/ui/playground")

    @app.get("/ui/{page}", include_in_schema=False)
    async def ui_page(page: str):
        if page not in PAGES:
            raise _UnknownPage(f"no console page {page!r}: the pages are " + ", ".join(f"/ui/{p}" for p in PAGES))
        return FileResponse(shell, media_type="text/html", headers=headers)
