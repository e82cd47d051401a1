"""`make bench`: every benchmark, measured side by side in one run; prints ratios, saves JSON.

python -m bench [dtype] [kernels] [generation] [routing] [vllm] [service] [prefix] [reroute] [moe] [training]   (default: all)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import kernels, routing, vllm_serving


def main(argv: list[str]) -> None:
    wanted = argv or ["dtype", "kernels", "generation", "routing", "vllm", "service", "prefix", "reroute", "moe",
                      "training"]
    results = {}
    if "dtype" in wanted:        # fp32 against bf16 on this CPU: what the compute dtype `auto` decides on
        from bench import dtype
        results["dtype"] = dtype.run(with_vllm=True)
    if "kernels" in wanted:
        results["kernels"] = kernels.run()
    if "generation" in wanted or "routing" in wanted:
        env = routing.Env.build()
        if "generation" in wanted:
            results["generation"] = routing.run_generation(env)
        if "routing" in wanted:
            results["routing"] = routing.run_latency(env)
    if "vllm" in wanted:
        results["vllm"] = vllm_serving.run_throughput()
    if "service" in wanted:
        results["service_latency"] = vllm_serving.run_service_latency()
    if "prefix" in wanted:       # vLLM's prefix cache on the instruction writer's fixed few-shot prefix
        from bench import prefix_cache
        results["prefix_cache"] = prefix_cache.run()
    if "reroute" in wanted:      # the ESFT rerouting kernel inside one MoE layer (issue 11)
        from bench import reroute
        results["reroute"] = reroute.run()
    if "moe" in wanted:          # ESFT adapters over the shared MoE base vs merged checkpoints (issue 11)
        from bench import moe_serving
        results["moe_serving"] = moe_serving.main([])
    if "training" in wanted:     # a LoRA training step: the model's own loss against answer_loss
        from bench import train_step
        results["training"] = train_step.run()
    out = Path("runs/bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nsaved {out / 'results.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
