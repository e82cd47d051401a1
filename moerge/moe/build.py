"""`moerge moe build`: upcycle the dense base and the pool's LoRA experts into an MoE base.

The way mergekit-moe and Branch-Train-MiX do it: attention, norms and embeddings come from the
base model; in every layer each routed MLP expert is the base MLP with one LoRA expert's MLP
deltas (gate_proj, up_proj, down_proj) merged in, and logical expert 0 is the plain base MLP
(`include_base=True`, the default: a token that matches no expert still gets the model it had).
An expert's attention LoRA is dropped: the MoE base shares one attention, as those methods do.

Router rows (no gradient training):
- "hidden" (default): a least-squares linear probe, per layer, from the MLP's input at a token to
  the expert that token belongs to. Its data are the hidden states of each expert's prompts (the
  card's examples, plus training samples of its task when the card names one), taken at every token
  from the user's text on: the text, the template's closing tokens (the last one predicts the answer's
  first token) and the answer. The template's opening tokens, the same in every request, are the plain
  base MLP's class (expert 0). No bias,
  as Mixtral's router has none; rows scaled by α. The build reports how often the router picks the
  own expert on held-out prompts of each expert (`diagnostics` in moerge_moe.json).
- "gates": each expert's PHATGOOSE gate on that layer's gate_proj input (the router's own input
  space), centred over the experts and scaled by α; expert 0's row is zero.

The result is a standard Mixtral checkpoint (transformers and vLLM load it) plus `moerge_moe.json`,
written to a staging folder and renamed into `<pool>/moe/<version[:16]>/`, then made current.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from moerge.experts.errors import ExpertError
from moerge.experts.lora import load_lora
from moerge.moe.base import MANIFEST, WEIGHTS, MoeBase, moe_root, set_current

MLP = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAME = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")
DEFAULT_ALPHA = 8.0


class MoeBuildError(ExpertError):
    status = 400


def mixtral_config(dense: dict, n_experts: int, top_k: int) -> dict:
    """A Mixtral config.json with the dense Llama model's shapes."""
    if not 1 <= top_k <= n_experts:
        raise MoeBuildError(f"top_k={top_k} must be between 1 and the number of experts ({n_experts})")
    rope = dense.get("rope_parameters") or {}
    theta = rope.get("rope_theta", dense.get("rope_theta", 10000.0))
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": dense["vocab_size"], "hidden_size": dense["hidden_size"],
        "intermediate_size": dense["intermediate_size"], "num_hidden_layers": dense["num_hidden_layers"],
        "num_attention_heads": dense["num_attention_heads"], "num_key_value_heads": dense["num_key_value_heads"],
        "head_dim": dense.get("head_dim") or dense["hidden_size"] // dense["num_attention_heads"],
        "hidden_act": dense.get("hidden_act", "silu"), "max_position_embeddings": dense["max_position_embeddings"],
        "rms_norm_eps": dense["rms_norm_eps"], "rope_theta": theta,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "tie_word_embeddings": bool(dense.get("tie_word_embeddings", False)),
        "bos_token_id": dense.get("bos_token_id"), "eos_token_id": dense.get("eos_token_id"),
        "pad_token_id": dense.get("pad_token_id"), "attention_dropout": 0.0, "sliding_window": None,
        "num_local_experts": n_experts, "num_experts_per_tok": top_k, "output_router_logits": False,
        "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.0, "dtype": "bfloat16", "use_cache": True,
    }


def _prompts_for(card, n_task: int, seed: int, examples: bool = True) -> list[tuple[str, str | None]]:
    """(prompt, answer or None): the card's example prompts (no answers), plus `n_task` training samples of
    its task (with answers) when the card names one."""
    out: list[tuple[str, str | None]] = []
    if examples or not (card.extra or {}).get("task"):
        out += [(p, None) for p in (card.examples or [card.description or card.name])]
    task = (card.extra or {}).get("task")
    if task and n_task:
        from moerge.tasks import BY_NAME
        if task in BY_NAME:
            out += [(smp.prompt, smp.answer) for smp in BY_NAME[task].samples(n_task, seed, "train", "content")]
    return out


def _user_spans(encoded: list[list[int]]) -> list[tuple[int, int]]:
    """Where the user's text sits in each chat-encoded prompt: after the longest prefix and before the
    longest suffix that all of them share (the chat template's system and role tokens)."""
    if len(encoded) < 2:
        return [(0, len(e)) for e in encoded]
    shortest = min(map(len, encoded))
    pre = 0
    while pre < shortest and len({e[pre] for e in encoded}) == 1:
        pre += 1
    suf = 0
    while suf < shortest - pre and len({e[-1 - suf] for e in encoded}) == 1:
        suf += 1
    return [(pre, len(e) - suf) for e in encoded]


def _mlp_inputs(model, encoded: list[list[int]]) -> list[list[torch.Tensor]]:
    """Per prompt, per layer, the MLP's input at every token [T, H] (float32)."""
    layers = model.model.layers
    out: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args: current.append(args[0][0].float()))
             for layer in layers]
    try:
        with torch.inference_mode():
            for ids in encoded:
                current.clear()
                model(input_ids=torch.tensor([ids]))
                out.append(list(current))
    finally:
        for h in hooks:
            h.remove()
    return out


def _probe_rows(feats: list[tuple[list[torch.Tensor], int]], n_classes: int, alpha: float,
                ridge: float = 1e-5) -> torch.Tensor:
    """[L, C, H] router rows: per layer a least-squares linear probe (no bias, as Mixtral's router has none)
    from a token's MLP input to its class, scaled by α. Targets are one-hot, centred per token.

    The ridge term (× the number of tokens, on inputs scaled to unit mean norm) was chosen on the
    diagnostic's held-out training-pool prompts of the 12 bundled experts (scripts: docs/moe.md):
    1e-2 → 34% of user tokens / 25% of prompts routed to their own expert, 1e-3 → 64/92,
    1e-4 → 70/99, 1e-5 → 71/99, 1e-6 → 72/99."""
    n_layers = len(feats[0][0])
    rows = []
    for layer in range(n_layers):
        x = torch.cat([f[layer] for f, _ in feats])                                 # [N, H]
        y = torch.cat([torch.full((f[layer].shape[0],), c) for f, c in feats])
        t = torch.nn.functional.one_hot(y, n_classes).float()
        t = t - 1.0 / n_classes
        scale = x.norm(dim=1).mean()
        xs = x / scale
        gram = xs.T @ xs + ridge * xs.shape[0] * torch.eye(xs.shape[1])
        w = torch.linalg.solve(gram, xs.T @ t).T                                   # [C, H]
        rows.append(alpha * w / scale)
    return torch.stack(rows)


def _route_accuracy(rows: torch.Tensor, feats: list[tuple[list[torch.Tensor], int]]) -> dict:
    """On held-out prompts: the share of user tokens whose top-1 router expert is their own (mean over
    layers), and the share of prompts whose mean router probability over user tokens peaks on their own
    expert (mean over layers)."""
    tok, prompt, n_tok, n_prompt = 0.0, 0.0, 0, 0
    for layer in range(rows.shape[0]):
        for f, c in feats:
            logits = f[layer] @ rows[layer].T
            tok += float((logits.argmax(1) == c).sum())
            n_tok += logits.shape[0]
            prompt += float(torch.softmax(logits, 1).mean(0).argmax() == c)
            n_prompt += 1
    return {"token_top1": round(tok / max(1, n_tok), 4), "prompt_top1": round(prompt / max(1, n_prompt), 4)}


def _standardise(vectors: torch.Tensor, alpha: float) -> torch.Tensor:
    """[E, H] gate vectors → router rows α·unit(v − mean)/scale, scale = mean ‖v − mean‖."""
    centred = vectors - vectors.mean(0, keepdim=True)
    norms = centred.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return alpha * centred / norms / norms.mean()


def build_moe(pool, base_dir: Path, experts: list[str] | None = None, *, include_base: bool = True,
              top_k: int = 2, router_init: str = "hidden", alpha: float = DEFAULT_ALPHA,
              prompts_per_expert: int = 32, make_current: bool = True, progress=print) -> MoeBase:
    """Build, version and store an MoE base from `base_dir` (dense) and the named LoRA experts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    cards = [c for c in pool.list() if c.kind == "lora"] if experts is None else [pool.get(n) for n in experts]
    for c in cards:
        if c.kind != "lora":
            raise MoeBuildError(f"expert {c.name!r} is a {c.kind}: an MoE base is built from LoRA experts")
    if not cards:
        raise MoeBuildError("no LoRA experts to build from: register some, or pass --expert NAME")
    if router_init not in ("hidden", "gates"):
        raise MoeBuildError(f"router_init {router_init!r}: use 'hidden' or 'gates'")
    names = (["base"] if include_base else []) + [c.name for c in cards]
    if len(set(names)) != len(names):
        raise MoeBuildError(f"an expert is named twice in {names}")
    dense_cfg = json.loads((Path(base_dir) / "config.json").read_text())
    config = mixtral_config(dense_cfg, len(names), top_k)
    n_layers = dense_cfg["num_hidden_layers"]

    progress(f"loading the dense base from {base_dir}")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    dense = model.state_dict()
    adapters = []
    for c in cards:
        ad = load_lora(pool.adapter_dir(c), pool.base_spec, max_rank=pool.max_rank)
        adapters.append(ad)

    # router rows
    rows = torch.zeros(n_layers, len(names), dense_cfg["hidden_size"])
    first = 1 if include_base else 0
    diagnostics: dict = {}
    if router_init == "hidden":
        from moerge.experts.training import user_turn
        from moerge.models.chat import encode_chat, encode_chat_answer
        # class 0 (the plain base MLP, when included): the chat template's own tokens, which no expert owns
        train, held = [], []
        for i, c in enumerate(cards):
            progress(f"router rows: hidden states of {c.name}'s prompts ({i + 1}/{len(cards)})")
            for split, seed in ((train, 0), (held, 1)):
                pairs = _prompts_for(c, prompts_per_expert if split is train else max(4, prompts_per_expert // 4),
                                     seed, examples=split is train)
                prompts = [encode_chat(tok, user_turn(p)) for p, _ in pairs]
                spans = _user_spans(prompts)
                full = [encode_chat_answer(tok, user_turn(p), a)[0] if a is not None else ids
                        for (p, a), ids in zip(pairs, prompts)]
                for f, (a, _b), ids in zip(_mlp_inputs(model, full), spans, prompts):
                    # the expert's tokens: from the user's text on (the template's closing tokens predict the
                    # answer's first token); the base's: the template's opening, the same in every request
                    split.append(([x[a:] for x in f], first + i))
                    if include_base and split is train:
                        split.append(([x[:a] for x in f], 0))
        probe = _probe_rows(train, len(names), alpha)
        rows[:] = probe
        diagnostics["held_out_routing"] = _route_accuracy(probe, [(f, c) for f, c in held if c >= first])
        progress(f"router on held-out prompts of each expert: own expert top-1 on "
                 f"{100 * diagnostics['held_out_routing']['token_top1']:.1f}% of the request's tokens, "
                 f"{100 * diagnostics['held_out_routing']['prompt_top1']:.1f}% of prompts (mean over layers)")
    else:
        for i, c in enumerate(cards):
            if "gate" not in c.artifacts:
                raise MoeBuildError(f"expert {c.name!r} has no trained gate: use --router-init hidden")
        gates = [pool.artifact_tensors(c, "gate") for c in cards]
        for layer in range(n_layers):
            key = f"model.layers.{layer}.mlp.gate_proj"
            vecs = []
            for c, g in zip(cards, gates):
                v = next((t for k, t in g.items() if k.startswith(key)), None)
                if v is None:
                    raise MoeBuildError(f"expert {c.name!r}'s gate has no vector for {key}: use --router-init hidden")
                vecs.append(v.float().reshape(-1))
            rows[layer, first:] = _standardise(torch.stack(vecs), alpha)

    # weights
    out: dict[str, torch.Tensor] = {}
    for k, v in dense.items():
        if ".mlp." in k or (k == "lm_head.weight" and config["tie_word_embeddings"]):
            continue
        out[k] = v.to(torch.bfloat16).contiguous()
    progress(f"merging {len(cards)} experts' MLP deltas into {n_layers} layers")
    for layer in range(n_layers):
        pre = f"model.layers.{layer}"
        out[f"{pre}.block_sparse_moe.gate.weight"] = rows[layer].to(torch.bfloat16).contiguous()
        for e, name in enumerate(names):
            ad = None if name == "base" else adapters[e - first]
            for m in MLP:
                w = dense[f"{pre}.mlp.{m}.weight"].float()
                mod = f"{pre}.mlp.{m}"
                if ad is not None and mod in ad.weights:
                    w = w + ad.delta(mod)
                out[f"{pre}.block_sparse_moe.experts.{e}.{MIXTRAL_NAME[m]}.weight"] = w.to(torch.bfloat16).contiguous()

    root = moe_root(pool.root)
    root.mkdir(parents=True, exist_ok=True)
    stage = root / f".stage-{uuid.uuid4().hex[:12]}"
    stage.mkdir()
    try:
        save_file(out, str(stage / WEIGHTS), metadata={"format": "pt"})
        version = hashlib.sha256((stage / WEIGHTS).read_bytes()).hexdigest()
        (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in TOKENIZER_FILES:
            if (Path(base_dir) / f).exists():
                shutil.copy2(Path(base_dir) / f, stage / f)
        manifest = {
            "format": "moerge-moe/1", "version": version, "experts": names,
            "sources": [""] * first + [c.artifacts["adapter_weights"] for c in cards],
            "base_model": pool.base_spec.model_id, "router_init": router_init, "alpha": alpha, "top_k": top_k,
            "include_base": include_base, "built_at": time.time(), "build_seconds": round(time.time() - t0, 1),
            "params": sum(t.numel() for t in out.values()), "diagnostics": diagnostics,
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        final = root / version[:16]
        if final.exists():          # the same inputs built before: keep the one on disk
            shutil.rmtree(stage)
        else:
            stage.rename(final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    base = MoeBase.load(final)
    if make_current:
        set_current(pool.root, base)
    progress(f"MoE base {base.id}: {len(names)} experts ({', '.join(names)}), top-{top_k}, "
             f"{manifest['params'] / 1e6:.0f}M parameters, in {time.time() - t0:.0f} s -> {final}")
    return base
