"""`moerge reports` and `moerge status`: the console's Evaluation and Health pages (and the pool's
sizes and usage) on the command line. The Pool and Playground pages have `moerge experts ...` and
`moerge chat`. `moerge/cli.py` mounts these commands."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err = Console(stderr=True)
reports_app = typer.Typer(no_args_is_help=True, help="List, show and compare evaluation reports (report.json).")
LABELS = {"held_in": "held-in", "held_out": "held-out", "routing_top1_held_in": "top-1 (held-in)",
          "ood_abstain": "OOD abstain", "routing_ms_p50": "routing ms p50", "tokens_per_second": "tokens/s"}
PERCENT = {"held_in", "held_out", "routing_top1_held_in", "ood_abstain"}
DIRS_HELP = "folder to scan for report.json, in it or one level down (repeatable); default: the reports_dirs setting"


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _cell(col: str, v) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f}" if col in PERCENT else f"{v:.1f}"


def _roots(dirs: list[Path]) -> list[Path]:
    from moerge.config import get_settings
    return list(dirs) if dirs else list(get_settings().reports_dirs)


def _reports(fn, *args):
    from moerge.experts.errors import ExpertError
    try:
        return fn(*args)
    except ExpertError as e:
        _fail(e.message)


def _print(data, as_json: bool) -> bool:
    if as_json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    return as_json


@reports_app.command("list")
def reports_list(dirs: list[Path] = typer.Option([], "--dir", help=DIRS_HELP),
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """The reports found, newest first (GET /v1/reports)."""
    from moerge.service import reports
    rows = [reports.listing(r) for r in reports.find_reports(_roots(dirs))]
    if _print(rows, as_json):
        return
    table = Table("report", "written", "n", "methods", "tasks", "wall s")
    for r in rows:
        table.add_row(r["id"], datetime.fromtimestamp(r["modified"]).isoformat(" ", "seconds"), str(r.get("n", "–")),
                      str(r.get("methods", "–")), str(r.get("tasks", "–")), str(r.get("wall_seconds", r.get("error", "–"))))
    console.print(table)
    if not rows:
        err.print(f"no report.json in {', '.join(map(str, _roots(dirs)))}: run `moerge eval --out runs/eval`")


@reports_app.command("show")
def reports_show(report_id: str = typer.Argument(..., help="a report id from `moerge reports list`"),
                 dirs: list[Path] = typer.Option([], "--dir", help=DIRS_HELP),
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """One report's summary table, aims and plots (GET /v1/reports/ID)."""
    from moerge.service import reports
    s = _reports(lambda: reports.summary(reports.get_report(_roots(dirs), report_id)))
    if _print(s, as_json):
        return
    table = Table("method", *[LABELS[c] for c in s["columns"]], "engine", title=f"report {s['id']} (%)")
    for r in s["rows"]:
        table.add_row(r["method"], *[_cell(c, r[c]) for c in s["columns"]], "+".join(r["engines"]) or "–")
    console.print(table)
    for line in s["aims"]:
        console.print(f"- {line}", highlight=False)
    for name in s["plots"]:
        console.print(f"plot: {Path(s['path']) / name}", highlight=False)


@reports_app.command("compare")
def reports_compare(a: str = typer.Argument(..., help="report A (the baseline)"),
                    b: str = typer.Argument(..., help="report B"),
                    dirs: list[Path] = typer.Option([], "--dir", help=DIRS_HELP),
                    as_json: bool = typer.Option(False, "--json")) -> None:
    """B against A, method by method: A → B (B − A) (GET /v1/reports/compare?a=A&b=B)."""
    from moerge.service import reports
    roots = _roots(dirs)
    c = _reports(lambda: reports.compare(reports.get_report(roots, a), reports.get_report(roots, b)))
    if _print(c, as_json):
        return
    table = Table("method", "in", *[LABELS[col] for col in c["columns"]], title=f"{c['b']['id']} against {c['a']['id']}")
    for r in c["rows"]:
        cells = []
        for col in c["columns"]:
            d = r[col]
            delta = "" if d["delta"] is None else f" ({'+' if d['delta'] > 0 else ''}{_cell(col, d['delta'])})"
            cells.append(f"{_cell(col, d['a'])} → {_cell(col, d['b'])}{delta}")
        table.add_row(r["method"], r["in"], *cells)
    console.print(table)
    for k, v in c["config_diff"].items():
        console.print(f"{k}: {json.dumps(v['a'])} → {json.dumps(v['b'])}", highlight=False)


def _get(url: str, path: str, key: str | None) -> dict:
    import httpx
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(url.rstrip("/") + path, headers=headers, timeout=60)
    except httpx.HTTPError as e:
        _fail(f"cannot reach {url}: {e}; start it with `moerge serve` or pass --url")
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        _fail(f"{path}: {r.status_code}: {message}")
    return r.json()


def status(url: str = typer.Option("http://127.0.0.1:8000", "--url", help="a running moerge server"),
           api_key: Optional[str] = typer.Option(None, "--api-key", help="a user or admin key, if the server has keys"),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """A running server's engines, key metrics and pool with sizes and usage (GET /v1/engine, /v1/stats, /v1/pool)."""
    data = {"engine": _get(url, "/v1/engine", api_key), "stats": _get(url, "/v1/stats", api_key),
            "pool": _get(url, "/v1/pool", api_key)["data"]}
    if _print(data, as_json):
        return
    e, s = data["engine"], data["stats"]
    console.print(f"engine: {e['executor']} — {'ready' if e['ready'] else 'starting'}; readiness {json.dumps(e['readiness'])}",
                  highlight=False)
    for eng in e["engines"]:
        state = json.dumps(eng["state"]) if eng.get("state") is not None else eng.get("state_error", "no describe()")
        console.print(f"  {eng['name']} ({eng['role']}): {state}", highlight=False)
    console.print(f"up {s['uptime_seconds']} s; {s['requests_total']} requests {json.dumps(s['requests'])}; "
                  f"tokens {json.dumps(s['tokens'])}", highlight=False)
    for method, r in s["routing"].items():
        console.print(f"  routing {method}: {r['requests']} requests, mean {r['mean_ms']} ms", highlight=False)
    table = Table("expert", "kind", "rank", "size MB", "requests", "description")
    for x in data["pool"]:
        size = "?" if x["size_bytes"] is None else f"{x['size_bytes'] / 2**20:.1f}"
        table.add_row(x["name"], x["kind"], str(x["rank"] or "–"), size, str(x["requests"]), x["description"][:50])
    console.print(table)
    console.print(f"{s['experts'].get('(base)', 0)} requests went to the base model", highlight=False)
