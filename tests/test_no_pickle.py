"""Nothing in moerge unpickles: the source of the package, the benchmarks and the scripts is scanned
for pickle-based loaders, so one added later fails here with its file and line."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("moerge", "bench", "scripts")
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "pickletools"}
NUMPY = {"np", "numpy"}


def _root_module(name: str | None) -> str:
    return (name or "").split(".", 1)[0]


def _kw_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def offenders_in(source: str, where: str = "<source>") -> list[str]:
    """Every pickle-based load in one module's source, as 'where:line: what'."""
    found = []
    torch_load_names = set()            # `from torch import load [as x]`
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if _root_module(a.name) in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if _root_module(node.module) in PICKLING_MODULES:
                found.append(f"{line}: from {node.module} import ...")
            if node.module == "torch":
                torch_load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
            if _root_module(node.module) == "pandas" and any("pickle" in a.name for a in node.names):
                found.append(f"{line}: from pandas import read_pickle")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if (name == "torch.load" or name in torch_load_names) and not _kw_true(node, "weights_only"):
                found.append(f"{line}: {name}(...) without weights_only=True")
            elif name.split(".")[0] in NUMPY and name.endswith(".load") and _kw_true(node, "allow_pickle"):
                found.append(f"{line}: {name}(..., allow_pickle=True)")
            elif name.endswith("read_pickle") or name.endswith("from_pickle"):
                found.append(f"{line}: {name}(...)")
            elif name in ("__import__", "importlib.import_module", "import_module") and node.args and \
                    isinstance(node.args[0], ast.Constant) and _root_module(str(node.args[0].value)) in PICKLING_MODULES:
                found.append(f"{line}: {name}({node.args[0].value!r})")
    return sorted(found, key=lambda f: int(f.split(":")[1]))


def test_the_scanner_finds_each_kind_of_pickle_load():
    source = "\n".join([
        "import pickle", "import joblib as jl", "from dill import loads", "import numpy as np", "import torch",
        "from torch import load as tload", "import importlib",
        "torch.load('x.pt')", "torch.load('x.pt', weights_only=False)", "tload('x.pt')",
        "np.load('x.npy', allow_pickle=True)", "importlib.import_module('cloudpickle')", "pd.read_pickle('x')",
        # allowed:
        "torch.load('x.pt', weights_only=True)", "np.load('x.npy')", "msg = 'never unpickled: pickle refused'",
    ])
    found = offenders_in(source, "snippet")
    assert [f.split(": ", 1)[0] for f in found] == [f"snippet:{i}" for i in (1, 2, 3, 8, 9, 10, 11, 12, 13)], found


def test_nothing_in_the_package_benchmarks_or_scripts_unpickles():
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50          # the scan really reads the code
    offenders = [o for p in files for o in offenders_in(p.read_text(), str(p.relative_to(ROOT)))]
    assert not offenders, ("pickle-based loading is not allowed (use safetensors / json; torch.load only with "
                           "weights_only=True):\n" + "\n".join(offenders))
