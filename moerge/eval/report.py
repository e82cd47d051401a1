"""Write report.md and the PNG plots from an evaluation's report.json."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moerge.tasks import COMPOSED, HELD_IN, HELD_OUT  # noqa: E402


def _fmt(v, pct=True) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.1f}"


def _methods(report: dict, shift: str | None = None) -> dict:
    if shift is None:
        return report["methods"]
    return report["shifts"][shift]["methods"]


def results_table(report: dict, shift: str | None = None) -> str:
    ood = report.get("out_of_domain", {})
    lines = ["| method | held-in | held-out | routing top-1 (held-in) | OOD abstain | routing ms (p50) | tokens/s | engine |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in _methods(report, shift).items():
        lat = r.get("routing_latency_ms", {}).get("p50")
        lines.append(f"| {label} | {_fmt(r.get('held_in'))} | {_fmt(r.get('held_out'))} | "
                     f"{_fmt(r.get('routing_top1_held_in'))} | {_fmt(ood.get(label, {}).get('abstain_rate'))} | "
                     f"{_fmt(lat, pct=False)} | {_fmt(r.get('tokens_per_second'), pct=False)} | "
                     f"{'+'.join(r.get('engines', [])) or '–'} |")
    return "\n".join(lines)


def aims(report: dict) -> list[str]:
    """The issue's aims, checked against this report's numbers (only those it has the methods for)."""
    m = report["methods"]
    ood = report.get("out_of_domain", {})

    def get(label, key):
        return (m.get(label) or {}).get(key)

    out = []
    gliders = [lab for lab in m if m[lab].get("method") == "glider" and get(lab, "held_in") is not None]
    oracle = get("oracle", "held_in")
    rivals = {lab: get(lab, "held_out") for lab in ("phatgoose", "arrow", "merge-linear", "merge-ties", "merge-cat")
              if get(lab, "held_out") is not None}
    for g in gliders:       # the default setting and each point of the α sweep, none picked after the fact
        g_in, g_out = get(g, "held_in"), get(g, "held_out") or 0.0
        if oracle:
            ratio = g_in / oracle
            out.append(f"- {g} on held-in: {_fmt(g_in)} = {100 * ratio:.0f}% of oracle {_fmt(oracle)} "
                       f"(aim ≥ 95%: {'met' if ratio >= 0.95 else 'missed'})")
        if rivals:
            top = max(rivals, key=rivals.get)
            out.append(f"- {g} on held-out: {_fmt(g_out)} vs best of phatgoose/arrow/merges ({top}) "
                       f"{_fmt(rivals[top])} (aim ≥: {'met' if g_out >= rivals[top] else 'missed'})")
    if "glider" in m:
        for lab in ("phatgoose", "arrow"):
            if get(lab, "held_in") is not None:
                below = get(lab, "held_in") < get("glider", "held_in")
                out.append(f"- {lab} held-in {_fmt(get(lab, 'held_in'))} below glider {_fmt(get('glider', 'held_in'))} "
                           f"(aim: {'met' if below else 'missed'})")
    for lab in ("glider-global", "embed", "retrieval"):
        if lab in ood and get(lab, "routing_top1_held_in") is not None:
            ab, top1 = ood[lab]["abstain_rate"], get(lab, "routing_top1_held_in")
            ok = ab >= 0.9 and top1 >= 0.95
            out.append(f"- {lab}: OOD abstain {_fmt(ab)} with held-in top-1 {_fmt(top1)} "
                       f"(aim ≥ 90 with ≥ 95: {'met' if ok else 'missed'})")
    return out


def composed_table(report: dict, shift: str | None = None) -> str:
    """Each method's mean over the composed tasks (two skills in sequence) against the best single
    expert's, and how often `chain` built a chain."""
    tasks = [t for t in report["config"]["tasks"] if t in COMPOSED]
    methods = _methods(report, shift)
    if not tasks:
        return ""
    best = methods.get("best-single", {}).get("composed")
    lines = ["| method | composed (mean) | vs best single expert | " + " | ".join(tasks) + " |",
             "|---|---|---|" + "---|" * len(tasks)]
    for label, r in methods.items():
        mean = r.get("composed")
        vs = f"{100 * (mean - best):+.1f}" if mean is not None and best is not None else "–"
        cells = [_fmt(r["tasks"].get(t, {}).get("accuracy")) for t in tasks]
        lines.append(f"| {label} | {_fmt(mean)} | {vs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verify_table(report: dict, shift: str | None = None) -> str:
    """Per task, what `verify` (router/verify.py) did with the expert glider-global chose: rejected (its
    answer handed the request back; the base model answered), passed, or not run (no expert, or one whose
    right answers copy the prompt too often to be checked)."""
    rows = [(label, r) for label, r in _methods(report, shift).items()
            if any("verify" in v for v in r["tasks"].values())]
    if not rows:
        return ""
    lines = ["| method | task | group | rejected | passed | not run | accuracy |", "|---|---|---|---|---|---|---|"]
    for label, r in rows:
        for task, v in r["tasks"].items():
            counts = v.get("verify", {})
            not_run = sum(n for k, n in counts.items() if k.startswith("not run"))
            group = "held-in" if task in HELD_IN else ("held-out" if task in HELD_OUT else "composed")
            lines.append(f"| {label} | {task} | {group} | {counts.get('rejected', 0)} | {counts.get('passed', 0)} | "
                         f"{not_run} | {_fmt(v.get('accuracy'))} |")
    return "\n".join(lines)


def per_task_table(report: dict, shift: str | None = None) -> str:
    tasks = report["config"]["tasks"]
    head = "| method | " + " | ".join(tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 1)]
    for label, r in _methods(report, shift).items():
        cells = [_fmt(r["tasks"].get(t, {}).get("accuracy")) for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shift_table(report: dict) -> str:
    """Each method's held-in and held-out means on the two shifts, and the drop."""
    t, c = _methods(report, "template"), _methods(report, "content")
    lines = ["| method | held-in template | held-in content | drop | held-out template | held-out content |",
             "|---|---|---|---|---|---|"]
    for label in t:
        if label not in c:
            continue
        a, b = t[label].get("held_in"), c[label].get("held_in")
        drop = f"{100 * (a - b):.1f}" if a is not None and b is not None else "–"
        lines.append(f"| {label} | {_fmt(a)} | {_fmt(b)} | {drop} | {_fmt(t[label].get('held_out'))} | "
                     f"{_fmt(c[label].get('held_out'))} |")
    return "\n".join(lines)


def expert_aims(report: dict) -> list[str]:
    """Issue 12's aims on the content shift: each expert (oracle) vs base and vs its template
    accuracy, the mean over the held-in experts, and glider-global's routing."""
    t, c = _methods(report, "template"), _methods(report, "content")
    if "oracle" not in c or "base" not in c:
        return []
    out = []
    held_in = [x for x in report["config"]["tasks"] if x in HELD_IN and x in c["oracle"]["tasks"]]
    worst_gain, worst_drop = None, None
    for task in held_in:
        ora = c["oracle"]["tasks"][task]["accuracy"]
        gain = ora - c["base"]["tasks"][task]["accuracy"]
        drop = (t["oracle"]["tasks"][task]["accuracy"] - ora) if "oracle" in t else None
        worst_gain = (gain, task) if worst_gain is None or gain < worst_gain[0] else worst_gain
        if drop is not None:
            worst_drop = (drop, task) if worst_drop is None or drop > worst_drop[0] else worst_drop
    if held_in:
        mean = c["oracle"]["held_in"]
        out.append(f"- content shift, every held-in expert ≥ base + 40: the smallest gain is "
                   f"{100 * worst_gain[0]:.0f} points ({worst_gain[1]}) ({'met' if worst_gain[0] >= 0.4 else 'missed'})")
        out.append(f"- content shift, mean over the held-in experts (oracle) {_fmt(mean)} (aim ≥ 85: "
                   f"{'met' if mean is not None and mean >= 0.85 else 'missed'})")
        if worst_drop is not None:
            out.append(f"- no expert more than 10 points lower on content than on template: the largest drop is "
                       f"{100 * worst_drop[0]:.0f} points ({worst_drop[1]}) ({'met' if worst_drop[0] <= 0.10 else 'missed'})")
    ood = report.get("out_of_domain", {}).get("glider-global")
    if "glider-global" in c and ood:
        top1, ab = c["glider-global"].get("routing_top1_held_in"), ood["abstain_rate"]
        ok = top1 is not None and top1 >= 0.95 and ab >= 0.95
        out.append(f"- content shift, glider-global top-1 {_fmt(top1)} and OOD abstain {_fmt(ab)} "
                   f"(aim ≥ 95 and ≥ 95: {'met' if ok else 'missed'})")
    return out


def plot_verify(report: dict, path: Path):
    """Per task and shift, what `verify` did with glider-global's expert: rejected, passed, not run."""
    shifts = report.get("shifts") or {"": {"methods": report.get("methods", {})}}
    runs = [(sh, m["verify"]) for sh, m in ((sh, v["methods"]) for sh, v in shifts.items()) if "verify" in m]
    if not runs:
        return None
    tasks = [t for t in report["config"]["tasks"] if any("verify" in r["tasks"].get(t, {}) for _, r in runs)]
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(tasks)), 4.8))
    width = 0.8 / len(runs)
    x = np.arange(len(tasks))
    for k, (shift, r) in enumerate(runs):
        counts = [r["tasks"].get(t, {}).get("verify", {}) for t in tasks]
        n = [max(1, sum(c.values())) for c in counts]
        rej = np.array([100 * c.get("rejected", 0) / m for c, m in zip(counts, n)])
        ok = np.array([100 * c.get("passed", 0) / m for c, m in zip(counts, n)])
        pos = x - 0.4 + width * (k + 0.5)
        hatch = "//" if shift == "content" else ""
        ax.bar(pos, rej, width, color="C3", hatch=hatch, label=f"rejected: the base model answered ({shift or 'eval'})")
        ax.bar(pos, ok, width, bottom=rej, color="C2", alpha=0.6, hatch=hatch, label=f"passed ({shift or 'eval'})")
    ax.set_xticks(x, tasks, rotation=45, ha="right", fontsize=8)
    for i, t in enumerate(tasks):
        if t in HELD_OUT:
            ax.get_xticklabels()[i].set_fontweight("bold")
    ax.set_ylabel("share of the task's prompts (%); the rest: not run")
    ax.set_ylim(0, 135)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title("verify: the expert's answer checked (held-out tasks in bold)")
    ax.legend(fontsize=7, ncol=2, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_shifts(report: dict, path: Path):
    """Per held-in task, template vs content accuracy for base, oracle and glider-global."""
    shifts = report.get("shifts", {})
    if not {"template", "content"} <= set(shifts):
        return None
    labels = [m for m in ("base", "oracle", "glider-global") if m in shifts["content"]["methods"]
              and m in shifts["template"]["methods"]]
    tasks = [t for t in report["config"]["tasks"] if t in HELD_IN + HELD_OUT]
    if not labels or not tasks:
        return None
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(tasks)), 4.8))
    width = 0.8 / (2 * len(labels))
    x = np.arange(len(tasks))
    k = 0
    for m in labels:
        for shift, hatch in (("template", ""), ("content", "//")):
            vals = [100 * shifts[shift]["methods"][m]["tasks"].get(t, {}).get("accuracy", np.nan) for t in tasks]
            ax.bar(x - 0.4 + width * (k + 0.5), vals, width, label=f"{m} ({shift})", hatch=hatch,
                   color=f"C{labels.index(m)}", alpha=0.55 if shift == "content" else 0.95)
            k += 1
    ax.set_xticks(x, tasks, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 128)                  # room above the bars for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.set_title("Template shift vs content shift, per task")
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict, out: Path) -> None:
    out = Path(out)
    plots = [plot_held_in_vs_out(report, out / "held_in_vs_held_out.png"),
             plot_routing_heatmap(report, out / "routing_heatmap.png"),
             plot_layer_mass(report, out / "layer_routing_mass.png"),
             plot_shifts(report, out / "template_vs_content.png"),
             plot_verify(report, out / "verify_checks.png")]
    shifts = list(report.get("shifts", {}))
    cost = report.get("cost", {})
    md = ["# moerge evaluation\n",
          f"n = {report['config']['n']} evaluation paraphrases per task (seed {report['config']['eval_seed']}); "
          f"wall time {cost.get('wall_seconds', '?')} s; peak RSS {cost.get('peak_rss_mb', '?')} MB; "
          f"generation cache hits {cost.get('cache_hits', '?')}, misses {cost.get('cache_misses', '?')}; "
          f"generated by engine {cost.get('generations_by_engine', '?')}.\n",
          "Accuracy in %. Routing top-1: share of held-in prompts whose own expert is chosen first "
          "(sequence methods), or mean share of routing mass on the own expert over layers (token methods). "
          "OOD abstain: share of the out-of-domain prompts routed to no expert.\n",
          "Shifts: `template` = evaluation phrasings never used in training, over the content of the "
          "template lists; `content` = the same phrasings over content from the evaluation pools "
          "(other words, entities, number ranges and lengths), which training never draws from "
          "(docs/TASKS.md).\n"]
    if "template" in shifts and "content" in shifts:
        md += ["## Template vs content\n", shift_table(report)]
        checks = expert_aims(report)
        if checks:
            md += ["\n## Aims for the experts (content shift)\n", *checks]
    for shift in shifts or [None]:
        title = f" ({shift} shift)" if shift else ""
        md += [f"\n## Summary{title}\n", results_table(report, shift)]
        checks = aims({**report, "methods": _methods(report, shift)})
        if checks:
            md += [f"\n## Aims for routing{title}\n", *checks]
        md += [f"\n## Per task{title}\n", per_task_table(report, shift)]
        bs = _methods(report, shift).get("best-single", {}).get("tasks", {})
        if bs:
            md += [f"\n## Best single expert per held-out task{title}\n", "| task | expert | accuracy |",
                   "|---|---|---|"]
            md += [f"| {t} | {v['expert']} | {_fmt(v['accuracy'])} |" for t, v in bs.items()]
        checked = verify_table(report, shift)
        if checked:
            md += [f"\n## Checked answers (verify){title}\n", checked]
        composed = composed_table(report, shift)
        if composed:
            md += [f"\n## Composed tasks{title}\n", composed]
    md += ["\n## Plots\n"] + [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    (out / "report.md").write_text("\n".join(md) + "\n")


def plot_held_in_vs_out(report: dict, path: Path):
    pts = [(k, r.get("held_in"), r.get("held_out")) for k, r in report["methods"].items()]
    pts = [(k, a, b) for k, a, b in pts if a is not None and b is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    # methods often share a point (e.g. 0% held-out): stack the labels of nearby points
    placed: list[tuple[float, float]] = []
    for k, a, b in sorted(pts, key=lambda p: (p[2], p[1])):
        x, y = 100 * a, 100 * b
        ax.scatter(x, y, s=40)
        n = sum(abs(x - px) < 15 and abs(y - py) < 0.4 for px, py in placed)
        placed.append((x, y))
        ax.annotate(k, (x, y), fontsize=8, xytext=(5, 4 + 11 * n), textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"} if n else None)
    ax.set_xlabel("held-in accuracy (%)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Routing methods: held-in vs held-out")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_routing_heatmap(report: dict, path: Path):
    methods = [k for k in ("embed", "retrieval", "glider-global") if k in report["methods"]]
    if not methods:
        return None
    experts = sorted({e for k in methods for t in report["methods"][k]["tasks"].values() for e in t["chosen_counts"]})
    tasks = [t for t in report["config"]["tasks"] if t in HELD_IN + HELD_OUT]
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 6), squeeze=False)
    for ax, k in zip(axes[0], methods):
        m = np.zeros((len(tasks), len(experts)))
        for i, t in enumerate(tasks):
            counts = report["methods"][k]["tasks"].get(t, {}).get("chosen_counts", {})
            total = sum(counts.values()) or 1
            for j, e in enumerate(experts):
                m[i, j] = counts.get(e, 0) / total
        ax.imshow(m, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(experts)), experts, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_title(f"{k}: task → chosen expert")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_mass(report: dict, path: Path):
    series = {}
    for k, r in report["methods"].items():
        per_layer: dict[int, list[float]] = {}
        for t, v in r["tasks"].items():
            for layer, mass in v.get("right_mass_per_layer", {}).items():
                per_layer.setdefault(int(layer), []).append(mass)
        if per_layer:
            series[k] = sorted((layer, float(np.mean(v))) for layer, v in per_layer.items())
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, pts in series.items():
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", ms=3, label=k)
    ax.set_xlabel("layer")
    ax.set_ylabel("routing mass on the task's own expert (%)")
    ax.set_title("Token-level routing on held-in tasks, per layer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
