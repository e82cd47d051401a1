"""Would gates trained *jointly* (each expert's data against the other experts' as negatives) route tokens
to the right expert, where the PHATGOOSE gates (each trained alone) and the Arrow prototypes do not?

For every distinct input of the adapted linears (per layer: attention in, o_proj in, MLP in, down_proj in),
the base model's hidden states of the training prompts' user tokens (training split only, the
`template` and `content` recipes' samples) train a linear softmax classifier over the held-in experts on the
PHATGOOSE-standardised x, with no bias: logit_e = standardise(x) · g_e / √d, the form both engines
already compute for phatgoose gates. It is measured on the evaluation paraphrases (both shifts): the
own expert's share of top-1 per token (user span), and per module after averaging the logits over the
prompt (sequence routing per layer), and one vote over all modules.

    .venv/bin/python scripts/joint_gate_probe.py [--train-per-task 24] [--eval-per-task 8] [--out FILE]

Measured (docs/results/joint_gate_probe.json: --train-per-task 16 --eval-per-task 6 --steps 200, 290 s on
an idle machine), own expert top-1, template / content shift:
- per token of the user's text: 63.1% / 59.3% (Arrow prototypes and PHATGOOSE gates: 19% / 18%,
  token_gate_diagnostic.py);
- per module, logits averaged over the user's tokens: 92.1% / 89.8%; one vote over all modules: 97.2% / 95.8%;
- averaged over the whole prompt instead, chat template included (never trained on): 41.0% / 40.5%.
An earlier run with --train-per-task 24 --eval-per-task 8 --steps 300 (29 min on 2 shared cores) gave
63.5% / 60.3% per token and 43.5% / 43.8% over the whole prompt.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-per-task", type=int, default=24)
    ap.add_argument("--eval-per-task", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from moerge.config import get_settings
    from moerge.experts.training import load_tokenizer
    from moerge.kernels.gating import standardise
    from moerge.models.chat import encode_chat
    from moerge.tasks import HELD_IN, get_task

    torch.manual_seed(0)
    t0 = time.time()
    base = get_settings().base_model_dir
    tok = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    inputs = {}          # one hook per distinct linear input of each layer
    for i, layer in enumerate(model.model.layers):
        for kind, mod in (("attn", layer.self_attn.q_proj), ("o", layer.self_attn.o_proj),
                          ("mlp", layer.mlp.gate_proj), ("down", layer.mlp.down_proj)):
            mod.register_forward_hook(lambda m, inp, out, key=f"{i}.{kind}": inputs.__setitem__(key, inp[0][0]))
    empty = encode_chat(tok, [{"role": "user", "content": "\u2063"}])
    marker = tok("\u2063", add_special_tokens=False)["input_ids"]
    head = next(i for i in range(len(empty)) if empty[i:i + len(marker)] == marker)
    tail = len(empty) - head - len(marker)

    def states(prompt: str) -> tuple[dict[str, torch.Tensor], int]:
        ids = encode_chat(tok, [{"role": "user", "content": prompt}])
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
        return {k: standardise(v.float()).half() for k, v in inputs.items()}, len(ids)

    def collect(split: str, n: int, shifts: tuple[str, ...], seed: int):
        xs: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
        labels, spans = [], []
        for e, task in enumerate(HELD_IN):
            for shift in shifts:
                for s in get_task(task).samples(n, seed, split, shift):
                    st, length = states(s.prompt)
                    user = slice(head, length - tail)
                    for k, v in st.items():
                        xs[k].append(v if split == "eval" else v[user])
                    labels.append(e)
                    spans.append((head, length - tail, length))
        return xs, labels, spans

    train, train_labels, train_spans = collect("train", args.train_per_task, ("template", "content"), 0)
    print(f"collected training states in {time.time() - t0:.0f} s", flush=True)
    evals = {sh: collect("eval", args.eval_per_task, (sh,), 20261124) for sh in ("template", "content")}
    print(f"collected evaluation states in {time.time() - t0:.0f} s", flush=True)

    E = len(HELD_IN)
    report = {"experts": E, "chance": 1 / E, "train_prompts_per_task": 2 * args.train_per_task,
              "eval_prompts_per_task": args.eval_per_task, "modules": len(train)}
    gates = {}
    for k, chunks in train.items():
        x = torch.cat(chunks).float()
        y = torch.cat([torch.full((len(c),), lab) for c, lab in zip(chunks, train_labels)])
        d = x.shape[1]
        g = torch.zeros(E, d, requires_grad=True)
        opt = torch.optim.Adam([g], lr=0.05)
        for _ in range(args.steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ g.T / math.sqrt(d), y) + 1e-4 * g.square().sum()
            loss.backward()
            opt.step()
        gates[k] = g.detach()
    print(f"trained {len(gates)} gate sets in {time.time() - t0:.0f} s", flush=True)

    for shift, (xs, labels, spans) in evals.items():
        per_token, per_module, votes, per_module_user, votes_user = [], [], [], [], []
        for j, lab in enumerate(labels):
            start, end, length = spans[j]
            vote, vote_user = torch.zeros(E), torch.zeros(E)
            for k, g in gates.items():
                x = xs[k][j].float()
                logits = x @ g.T / math.sqrt(x.shape[1])
                per_token.append(logits[start:end].argmax(-1).eq(lab).float().mean().item())
                m = logits[:length].mean(0)
                per_module.append(float(m.argmax() == lab))
                mu = logits[start:end].mean(0)
                per_module_user.append(float(mu.argmax() == lab))
                vote += torch.softmax(m, 0)
                vote_user += torch.softmax(mu, 0)
            votes.append(float(vote.argmax() == lab))
            votes_user.append(float(vote_user.argmax() == lab))
        report[shift] = {"own_expert_top1_per_token_user": round(sum(per_token) / len(per_token), 3),
                         "own_expert_top1_per_module_pooled_prompt": round(sum(per_module) / len(per_module), 3),
                         "own_expert_top1_vote_all_modules": round(sum(votes) / len(votes), 3),
                         "own_expert_top1_per_module_pooled_user": round(sum(per_module_user) / len(per_module_user), 3),
                         "own_expert_top1_vote_all_modules_user": round(sum(votes_user) / len(votes_user), 3)}
    report["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
