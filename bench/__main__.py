"""`make bench`: every benchmark, measured side by side in one run; prints ratios, saves JSON.

python -m bench [routing] [kernels] [generation]   (default: all)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import kernels, routing


def main(argv: list[str]) -> None:
    wanted = argv or ["kernels", "generation", "routing"]
    results = {}
    if "kernels" in wanted:
        results["kernels"] = kernels.run()
    if "generation" in wanted or "routing" in wanted:
        env = routing.Env.build()
        if "generation" in wanted:
            results["generation"] = routing.run_generation(env)
        if "routing" in wanted:
            results["routing"] = routing.run_latency(env)
    out = Path("runs/bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nsaved {out / 'results.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
