"""How well do the token-level gates pick a prompt's own expert, token by token?

For each held-in task, a few evaluation paraphrases plus their reference answers go through
the base model once; at every adapted module, each token's top-1 expert under the `arrow`
prototypes and the `phatgoose` gates is compared with the expert trained on that task.
Shares are reported per span (the chat template's fixed tokens, the user's text, the answer)
and per module kind; also with the hidden states centred and whitened by statistics of the
out-of-domain calibration prompts (no expert data), and how similar the experts' vectors are
(mean off-diagonal |cosine| per module kind). Chance is 1 / number of experts.

    .venv/bin/python scripts/token_gate_diagnostic.py [--per-task 4]
"""

from __future__ import annotations

import argparse
import collections
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-task", type=int, default=4)
    args = ap.parse_args()

    from moerge.config import get_settings
    from moerge.eval.harness import EVAL_SEED
    from moerge.eval.run import prepare
    from moerge.tasks import HELD_IN, get_task, out_of_domain_prompts
    from moerge.router.calibrate import ood_split
    from moerge.kernels.gating import gate_logits
    from moerge.router.base import make_router

    system, _ = prepare(get_settings(), engine="reference")
    pool, ctx = system.pool, system.router_ctx
    engine = system.local[0].engine
    names = pool.names()
    engine.row_plan(system.plan(make_router("arrow", ctx).route("probe")))   # load every expert's layers
    expert_of = {(c.extra or {}).get("task"): c.name for c in pool.list() if c.kind == "lora"}
    seen: dict[str, torch.Tensor] = {}
    for layer in engine.layers.values():
        layer.register_forward_hook(lambda mod, inp, out: seen.__setitem__(mod.name, inp[0].detach()[0]))
    # the template around the user's text: a fixed head, and a fixed tail opening the answer
    empty = engine.encode_chat([{"role": "user", "content": "\u2063"}])
    marker = engine.tok("\u2063", add_special_tokens=False)["input_ids"]
    head = next(i for i in range(len(empty)) if empty[i:i + len(marker)] == marker)
    tail = len(empty) - head - len(marker)

    def run(prompt_ids):
        with torch.inference_mode():
            engine.model(input_ids=torch.tensor([prompt_ids]))

    # per-module mean and std of the hidden states on out-of-domain prompts
    generic = [engine.encode_chat([{"role": "user", "content": q}])
               for q in ood_split(out_of_domain_prompts(), "calibration")]
    acts: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    for ids in generic:
        run(ids)
        for m, x in seen.items():
            acts[m].append(x)
    stats = {m: (torch.cat(xs).mean(0), torch.cat(xs).std(0) + 1e-4) for m, xs in acts.items()}
    del acts

    report = {"chance": 1 / len(names), "experts": len(names), "per_task": args.per_task}
    for method in ("arrow", "phatgoose"):
        router = make_router(method, ctx)
        gates = engine._gates(system.plan(router.route("probe")))
        spans: dict[str, list[float]] = collections.defaultdict(list)
        kinds: dict[str, list[float]] = collections.defaultdict(list)
        variants: dict[str, list[float]] = collections.defaultdict(list)
        similarity: dict[str, list[float]] = collections.defaultdict(list)
        for module, (_, g) in gates.items():
            gn = g / g.norm(dim=-1, keepdim=True)
            c = (gn @ gn.T).abs()
            similarity[module.rsplit(".", 1)[1]].append(c[~torch.eye(len(c), dtype=torch.bool)].mean().item())
        # per-expert logit statistics on the out-of-domain prompts: the scale calibration of pooled routing
        logit_rows: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
        for ids in generic:
            run(ids)
            for module, (pos, g) in gates.items():
                logit_rows[module].append(gate_logits(seen[module], g, router.mode))
        lstats = {m: (torch.cat(r).mean(0), torch.cat(r).std(0) + 1e-6) for m, r in logit_rows.items()}
        del logit_rows
        pooled: dict[str, list[float]] = collections.defaultdict(list)
        for task in HELD_IN:
            right = names.index(expert_of[task])
            for s in get_task(task).samples(args.per_task, EVAL_SEED, "eval"):
                prompt = engine.encode_chat([{"role": "user", "content": s.prompt}])
                answer = engine.tok(s.answer, add_special_tokens=False)["input_ids"]
                run(prompt + answer)
                cut = {"template": torch.cat([torch.arange(0, head), torch.arange(len(prompt) - tail, len(prompt))]),
                       "user": torch.arange(head, len(prompt) - tail),
                       "answer": torch.arange(len(prompt), len(prompt) + len(answer))}
                n_prompt = len(prompt)
                votes = {"raw": 0, "calibrated": 0}
                for module, (pos, g) in gates.items():
                    lg = gate_logits(seen[module][:n_prompt], g, router.mode)
                    mu_l, sd_l = lstats[module]
                    for name, z in (("raw", lg), ("calibrated", (lg - mu_l) / sd_l)):
                        m = z.mean(0)
                        pooled[f"per_module_{name}"].append(float(pos[m.argmax()] == right))
                        full = torch.zeros(len(names))
                        full[pos] = torch.softmax(m, 0)
                        votes[name] = votes[name] + full
                        run_mean = z.cumsum(0) / torch.arange(1, len(z) + 1).unsqueeze(1)
                        hit = pos[run_mean.argmax(-1)].eq(right).float()
                        pooled[f"prefix_mean_user_{name}"].append(hit[cut["user"]].mean().item())
                        pooled[f"prefix_mean_last_{name}"].append(hit[-1].item())
                for name, v in votes.items():
                    pooled[f"all_modules_vote_{name}"].append(float(v.argmax() == right))
                for module, (pos, g) in gates.items():
                    top = pos[gate_logits(seen[module], g, router.mode).argmax(-1)]
                    hit = top.eq(right).float()
                    for span, idx in cut.items():
                        spans[span].append(hit[idx].mean().item())
                    kinds[module.rsplit(".", 1)[1]].append(hit[cut["user"]].mean().item())
                    mu, sd = stats[module]
                    x = seen[module][cut["user"]]
                    for name, xx in (("centred", x - mu), ("whitened", (x - mu) / sd)):
                        top_v = pos[gate_logits(xx, g, router.mode).argmax(-1)]
                        variants[name].append(top_v.eq(right).float().mean().item())
        report[method] = {"own_expert_top1_by_span": {k: round(sum(v) / len(v), 3) for k, v in spans.items()},
                          "own_expert_top1_user_tokens_by_module": {k: round(sum(v) / len(v), 3)
                                                                    for k, v in sorted(kinds.items())},
                          "own_expert_top1_user_tokens_transformed": {k: round(sum(v) / len(v), 3)
                                                                      for k, v in variants.items()},
                          "pooled_over_prompt": {k: round(sum(v) / len(v), 3) for k, v in sorted(pooled.items())},
                          "mean_offdiagonal_abs_cosine_by_module": {k: round(sum(v) / len(v), 3)
                                                                    for k, v in sorted(similarity.items())}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
