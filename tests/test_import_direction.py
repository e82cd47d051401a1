"""Imports run one way, from foundations up (STYLE.md): a module may import its own
subpackage, any lower layer, and a sibling in its layer, never a higher layer. eval and
service are siblings that must not import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moerge"

# top-level module or subpackage of moerge -> layer
LAYERS = {
    "config": 0, "assets": 0, "compute": 0,
    "tasks": 1, "models": 1, "kernels": 1,
    "experts": 2, "moe": 2,    # the MoE base and ESFT adapters: built from, and registered in, the pool
    "router": 3,
    "plan": 4,
    "executors": 5,
    "startup": 6,              # settings -> assets -> pool -> engines -> router context, for every caller
    "eval": 7, "service": 7,
    "cli": 8,
}
SIBLINGS_APART = {frozenset({"eval", "service"})}
HEAVY = {"torch", "numpy", "transformers", "vllm", "sentence_transformers", "faiss", "fastapi", "peft"}


def _unit(path: Path, root: Path = PACKAGE) -> str:
    """The top-level part of moerge a file belongs to ("" for moerge/__init__.py)."""
    rel = path.relative_to(root).with_suffix("")
    return "" if rel.parts == ("__init__",) else rel.parts[0]


def _module_name(path: Path, root: Path) -> str:
    parts = ("moerge",) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                  # relative: resolve against the package
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from moerge import router` imports the subpackage itself
            out += [(node.lineno, f"{module}.{alias.name}" if module == "moerge" else module) for alias in node.names]
    return out


def _target(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "moerge" and len(parts) > 1 else None


def wrong_way_imports(root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        src = _unit(path, root)
        if not src:
            continue
        for line, module in imported_modules(path, root):
            dst = _target(module)
            if dst is None or dst == src or dst not in LAYERS:
                continue
            up = LAYERS[dst] > LAYERS[src]
            apart = frozenset({src, dst}) in SIBLINGS_APART
            if up or apart:
                why = "up" if up else "sideways"
                bad.append(f"{path.relative_to(root.parent)}:{line}: {src} (layer {LAYERS[src]}) imports "
                           f"{module} ({why}, layer {LAYERS[dst]})")
    return bad


def test_every_part_of_the_package_has_a_layer():
    units = {_unit(p) for p in PACKAGE.rglob("*.py")} - {""}
    assert units <= set(LAYERS), f"give these a layer in LAYERS: {sorted(units - set(LAYERS))}"


def test_imports_run_from_foundations_up():
    bad = wrong_way_imports()
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_check_sees_relative_nested_and_package_imports(tmp_path):
    pkg = tmp_path / "moerge"
    for folder in ("kernels", "router", "eval", "service"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "kernels" / "gating.py").write_text("def f():\n    from moerge.router import base\n")
    (pkg / "router" / "base.py").write_text("from ..eval import harness\nfrom . import context\n")
    (pkg / "eval" / "harness.py").write_text("from moerge import service\nimport moerge.kernels.gating\n")
    (pkg / "service" / "app.py").write_text("import moerge.router.base\n")
    bad = wrong_way_imports(pkg)
    assert [b.split(": ")[0] for b in bad] == ["moerge/eval/harness.py:1", "moerge/kernels/gating.py:2",
                                              "moerge/router/base.py:1"]


def test_importing_the_package_loads_nothing_heavy():
    mods = {m.split(".")[0] for _, m in imported_modules(PACKAGE / "__init__.py")}
    assert not (mods & (HEAVY | {"moerge"})), f"moerge/__init__.py imports {sorted(mods)}"
    code = "import sys, moerge; print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in %r)))" % HEAVY
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not loaded, f"`import moerge` loads {loaded}"
