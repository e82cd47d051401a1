"""The bundled library's per-expert figures from its manifests, as a markdown table (docs/results/library.md).

python scripts/library_table.py [LIBRARY]   (default: moerge/experts/library)

Every figure is what `moerge experts build` measured after training (reference engine, fp32 weights,
n = 50 evaluation prompts per shift, seed 20261124) and wrote into the manifest; nothing is re-run here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from moerge.experts.bundled import LIBRARY
from moerge.tasks import HELD_IN


def rows(library: Path) -> list[dict]:
    base = json.loads((library / "base_accuracy.json").read_text()) if (library / "base_accuracy.json").exists() else {}
    out = []
    for task in HELD_IN:
        m = json.loads((library / task / "manifest.json").read_text())
        acc = m["accuracy"]["expert"]
        if not isinstance(acc, dict):          # a first-release manifest: the template shift only
            acc = {"template": acc}
        b = base.get(task) or {}
        out.append({"task": task, "recipe": m["config"].get("data", "template-lists-v0"),
                    "steps": m["steps_run"], "compute": m.get("compute_dtype", "bfloat16"),
                    "template": acc.get("template"), "content": acc.get("content"),
                    "base_content": b.get("content") if isinstance(b, dict) else None,
                    "selection": m.get("selection")})
    return out


def fmt(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}"


def table(library: Path) -> str:
    lines = ["| expert | recipe | steps | template | content | base (content) | content − base | dev: incumbent → candidate |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows(library):
        gain = None if r["content"] is None or r["base_content"] is None else r["content"] - r["base_content"]
        sel = r["selection"]
        dev = "–" if not sel else (" / ".join(fmt(v) for v in sel["incumbent_dev"].values()) + " → "
                                   + " / ".join(fmt(v) for v in sel["candidate_dev"].values()))
        lines.append(f"| {r['task']} | {r['recipe']} | {r['steps']} | {fmt(r['template'])} | {fmt(r['content'])} | "
                     f"{fmt(r['base_content'])} | {fmt(gain)} | {dev} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(Path(sys.argv[1]) if len(sys.argv) > 1 else LIBRARY), end="")
