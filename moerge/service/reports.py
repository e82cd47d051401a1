"""Find the evaluation reports (`report.json`) under a few folders, summarise one as tables, and
compare two method by method. The console's Evaluation page, GET /v1/reports and `moerge reports` read them here."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from moerge.experts.errors import ExpertError

# The summary table's columns, in the order report.md prints them. Accuracies and rates are
# fractions (0..1); the two speeds are plain numbers.
COLUMNS = ("held_in", "held_out", "routing_top1_held_in", "ood_abstain", "routing_ms_p50", "tokens_per_second")
_PLOT_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.png$")


class ReportError(ExpertError):
    """A report folder holds a report.json that cannot be read."""
    status = 422


class UnknownReportError(ExpertError):
    """No report (or plot) by that name among the scanned folders."""
    status = 404


@dataclass(frozen=True)
class ReportRef:
    id: str          # the folder as a relative-looking path, e.g. "docs/results" or "runs/eval-quick"
    folder: Path
    modified: float

    @property
    def json_path(self) -> Path:
        return self.folder / "report.json"


def find_reports(roots: list[Path]) -> list[ReportRef]:
    """Every `report.json` in a root or one level below it, newest first."""
    found: dict[str, ReportRef] = {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
        for folder in candidates:
            path = folder / "report.json"
            if path.is_file():
                rid = folder.as_posix().lstrip("/")
                found.setdefault(rid, ReportRef(rid, folder, path.stat().st_mtime))
    return sorted(found.values(), key=lambda r: (-r.modified, r.id))


def get_report(roots: list[Path], report_id: str) -> ReportRef:
    # Only ids found by the scan are served, so a request can never name an arbitrary file.
    for ref in find_reports(roots):
        if ref.id == report_id.strip("/"):
            return ref
    raise UnknownReportError(f"no evaluation report {report_id!r}: GET /v1/reports (or `moerge reports list`) "
                             "lists them; reports are read from the folders in the reports_dirs setting")


def load(ref: ReportRef) -> dict:
    try:
        data = json.loads(ref.json_path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{ref.json_path} is not a readable report ({e}): re-run `moerge eval --out "
                          f"{ref.folder}`") from None
    if not isinstance(data, dict) or not isinstance(data.get("methods"), dict):
        raise ReportError(f"{ref.json_path} has no 'methods' table: it is not a moerge evaluation report")
    return data


def listing(ref: ReportRef) -> dict:
    """One line of the report list: where, when, how big."""
    out = {"id": ref.id, "path": str(ref.folder), "modified": ref.modified}
    try:
        data = load(ref)
    except ReportError as e:
        return {**out, "error": e.message}
    config, cost = data.get("config", {}), data.get("cost", {})
    return {**out, "n": config.get("n"), "methods": len(data["methods"]), "tasks": len(config.get("tasks", [])),
            "wall_seconds": cost.get("wall_seconds")}


def plot_path(ref: ReportRef, name: str) -> Path:
    if not _PLOT_NAME.match(name) or not (ref.folder / name).is_file():
        raise UnknownReportError(f"report {ref.id!r} has no plot {name!r}: its summary lists the plots it has")
    return ref.folder / name


def _row(label: str, method: dict, ood: dict) -> dict:
    return {"method": label,
            "held_in": method.get("held_in"), "held_out": method.get("held_out"),
            "routing_top1_held_in": method.get("routing_top1_held_in"),
            "ood_abstain": ood.get(label, {}).get("abstain_rate"),
            "routing_ms_p50": (method.get("routing_latency_ms") or {}).get("p50"),
            "tokens_per_second": method.get("tokens_per_second"),
            "engines": list(method.get("engines") or [])}


def _aims(folder: Path) -> list[str]:
    """The aims as report.md states them (they are computed when the report is written)."""
    md = folder / "report.md"
    if not md.is_file():
        return []
    lines, inside = [], False
    for line in md.read_text().splitlines():
        if line.startswith("## "):
            inside = line.strip() == "## Aims"
        elif inside and line.startswith("- "):
            lines.append(line[2:])
    return lines


def summary(ref: ReportRef) -> dict:
    data = load(ref)
    config, ood = data.get("config", {}), data.get("out_of_domain", {})
    tasks = list(config.get("tasks", []))
    rows = [_row(label, m, ood) for label, m in data["methods"].items()]
    per_task = [{"method": label, "accuracy": {t: (m.get("tasks", {}).get(t) or {}).get("accuracy") for t in tasks}}
                for label, m in data["methods"].items()]
    best = [{"task": t, "expert": v.get("expert"), "accuracy": v.get("accuracy")}
            for t, v in data["methods"].get("best-single", {}).get("tasks", {}).items()]
    plots = sorted(p.name for p in ref.folder.glob("*.png"))
    return {"id": ref.id, "path": str(ref.folder), "modified": ref.modified,
            "config": {k: config.get(k) for k in ("n", "eval_seed", "tasks", "experts") if k in config},
            "cost": data.get("cost", {}), "columns": list(COLUMNS), "rows": rows,
            "per_task": {"tasks": tasks, "rows": per_task}, "best_single": best,
            "aims": _aims(ref.folder), "plots": plots}


def _delta(a, b):
    return None if a is None or b is None else b - a


def compare(a: ReportRef, b: ReportRef) -> dict:
    """Report b against report a: every method in either, every summary column, b − a."""
    sa, sb = summary(a), summary(b)
    rows_a = {r["method"]: r for r in sa["rows"]}
    rows_b = {r["method"]: r for r in sb["rows"]}
    labels = list(rows_a) + [m for m in rows_b if m not in rows_a]
    rows = []
    for label in labels:
        ra, rb = rows_a.get(label, {}), rows_b.get(label, {})
        rows.append({"method": label, "in": "both" if ra and rb else ("a" if ra else "b"),
                     **{c: {"a": ra.get(c), "b": rb.get(c), "delta": _delta(ra.get(c), rb.get(c))}
                        for c in COLUMNS}})
    tasks = [t for t in sa["per_task"]["tasks"] if t in sb["per_task"]["tasks"]]
    acc_a = {r["method"]: r["accuracy"] for r in sa["per_task"]["rows"]}
    acc_b = {r["method"]: r["accuracy"] for r in sb["per_task"]["rows"]}
    per_task = [{"method": m, "delta": {t: _delta(acc_a[m].get(t), acc_b[m].get(t)) for t in tasks}}
                for m in labels if m in acc_a and m in acc_b]
    config_diff = {k: {"a": sa["config"].get(k), "b": sb["config"].get(k)}
                   for k in sorted(set(sa["config"]) | set(sb["config"]))
                   if sa["config"].get(k) != sb["config"].get(k)}
    return {"a": {"id": sa["id"], "modified": sa["modified"]}, "b": {"id": sb["id"], "modified": sb["modified"]},
            "columns": list(COLUMNS), "rows": rows, "per_task": {"tasks": tasks, "rows": per_task},
            "config_diff": config_diff}
