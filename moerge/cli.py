"""The `moerge` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from moerge.config import get_settings
from moerge.service import console_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="moerge: one OpenAI-compatible endpoint over a pool of routed experts.")
experts_app = typer.Typer(no_args_is_help=True, help="Register, list, show and remove experts.")
app.add_typer(experts_app, name="experts")
# The web console's Evaluation and Health pages on the command line (moerge/service/console_cli.py).
app.add_typer(console_cli.reports_app, name="reports")
app.command("status")(console_cli.status)
console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _guard(fn):
    """Turn user-caused errors into one line on stderr and a non-zero exit."""
    from functools import wraps

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from moerge.assets import AssetError
        from moerge.experts.errors import ExpertError
        try:
            return fn(*args, **kwargs)
        except ExpertError as e:
            fail(e.message)
        except AssetError as e:
            fail(str(e))
        except (OSError, ValueError) as e:
            fail(f"{type(e).__name__}: {e}")
    return wrapper


@app.command()
@_guard
def assets() -> None:
    """Prepare the base model and embedder in the cache folder (idempotent)."""
    from moerge.assets import ensure_assets
    a = ensure_assets(get_settings(), progress=lambda m: err.print(m))
    console.print(f"base model: {a.base_model}\nembedder:   {a.embedder}")


@app.command()
def config(as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the effective settings."""
    s = get_settings()
    data = json.loads(s.model_dump_json())
    data["registry_url"] = s.registry_url
    data["pool_path"] = str(s.pool_path)
    if data.get("admin_key"):
        data["admin_key"] = "***"
    data["api_keys"] = ["***"] * len(data.get("api_keys") or [])
    from moerge import compute
    data["vllm_dtype_resolved"] = compute.resolve_dtype(s.vllm_dtype)
    data["compute"] = compute.describe()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table("setting", "value", title=f"moerge settings (toml: {os.environ.get('MOERGE_CONFIG', 'moerge.toml')})")
    for k, v in data.items():
        table.add_row(k, str(v))
    console.print(table)


def _pool():
    from moerge.experts.pool import open_pool
    return open_pool()


@experts_app.command("register")
@_guard
def experts_register(
    path: Optional[Path] = typer.Argument(None, help="LoRA adapter folder (peft save_pretrained) or model folder"),
    name: str = typer.Option(..., "--name"),
    description: str = typer.Option("", "--description"),
    example: list[str] = typer.Option([], "--example", help="an example prompt (repeatable)"),
    tag: list[str] = typer.Option([], "--tag"),
    kind: str = typer.Option("lora", "--kind", help="lora | model"),
    model: Optional[str] = typer.Option(None, "--model", help="LiteLLM model string, for --kind model"),
    api_base: Optional[str] = typer.Option(None, "--api-base"),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="env var holding the API key"),
) -> None:
    """Register an expert: a LoRA adapter folder, a local model folder, or a served model."""
    pool = _pool()
    if kind == "lora":
        if path is None:
            fail("give the adapter folder: moerge experts register PATH --name N")
        card = pool.register_lora(path, name, description, tags=tag, examples=example)
    elif kind == "model":
        card = pool.register_model(name, description, model=model, api_base=api_base,
                                   api_key_env=api_key_env, path=path, tags=tag, examples=example)
    else:
        fail(f"--kind must be lora or model, not {kind!r}")
    console.print(f"registered [bold]{card.name}[/] ({card.kind}, {len(card.artifacts)} artifacts)")


@experts_app.command("list")
@_guard
def experts_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the experts in the pool."""
    cards = _pool().list()
    if as_json:
        print(json.dumps([_summary(c) for c in cards], indent=2))
        return
    table = Table("name", "kind", "rank", "gate", "arrow", "description")
    for c in cards:
        table.add_row(c.name, c.kind, str(c.rank or "-"), "yes" if "gate" in c.artifacts else "no",
                      "yes" if "arrow" in c.artifacts else "no", c.description[:60])
    console.print(table)
    console.print(f"{len(cards)} experts")


def _summary(card) -> dict:
    return {"name": card.name, "kind": card.kind, "description": card.description, "rank": card.rank,
            "has_gate": "gate" in card.artifacts, "has_arrow": "arrow" in card.artifacts,
            "artifacts": sorted(card.artifacts)}


@experts_app.command("show")
@_guard
def experts_show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one expert's card."""
    card = _pool().get(name)
    data = card.model_dump()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table("field", "value", title=name)
    for k, v in data.items():
        table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    console.print(table)


@experts_app.command("update")
@_guard
def experts_update(name: str, description: Optional[str] = typer.Option(None, "--description"),
                   tag: Optional[list[str]] = typer.Option(None, "--tag"),
                   example: Optional[list[str]] = typer.Option(None, "--example")) -> None:
    """Change an expert's description, tags or examples."""
    _pool().update(name, description=description, tags=tag or None, examples=example or None)
    console.print(f"updated {name}")


@experts_app.command("remove")
@_guard
def experts_remove(name: str) -> None:
    """Remove an expert (and artifacts no other expert uses)."""
    _pool().remove(name)
    console.print(f"removed {name}")


@experts_app.command("build")
@_guard
def experts_build(
    tasks: Optional[list[str]] = typer.Option(None, "--tasks", help="held-in tasks (default: all 12)"),
    out: Optional[Path] = typer.Option(None, "--out", help="library folder (default: the bundled one)"),
    background: bool = typer.Option(False, "--background", help="run detached, logging to a file"),
    log_file: Path = typer.Option(Path("runs/build-experts.log"), "--log"),
    data: str = typer.Option("recorded", "--data", help="training data recipe: recorded (each expert's own, as "
                             "its manifest in the library records: rebuilds the bundled library as committed) | "
                             "template-lists-v0 (the first release's) | content-pools-v1 (paraphrase families over "
                             "the training pools, docs/TASKS.md)"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="the step budget (default: the task's, "
                                        "moerge/experts/build.py; the dev early stop still applies); needs a named "
                                        "--data recipe"),
) -> None:
    """Train the expert library: one LoRA + PHATGOOSE gate per held-in task (resumable)."""
    from moerge.experts.bundled import LIBRARY
    if background:
        import subprocess
        log_file.parent.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "moerge.cli", "experts", "build"]
        for t in tasks or []:
            args += ["--tasks", t]
        if out:
            args += ["--out", str(out)]
        args += ["--data", data]
        if steps is not None:
            args += ["--steps", str(steps)]
        with open(log_file, "ab") as fh:
            proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        console.print(f"building in the background: pid {proc.pid}, log {log_file}")
        return
    from moerge.assets import ensure_base_model
    from moerge.experts.build import build_library
    base = ensure_base_model(get_settings())
    build_library(base, out or LIBRARY, tasks, log=lambda m: print(m, flush=True), data=data, steps=steps)


@experts_app.command("choose")
@_guard
def experts_choose(
    candidates: Path = typer.Option(..., "--candidates", help="a folder of retrained experts (`experts build --out`)"),
    install: bool = typer.Option(False, "--install", help="replace the library's expert where the candidate wins"),
    margin: float = typer.Option(0.02, "--margin", help="how much higher the candidate's mean dev accuracy must be"),
) -> None:
    """Compare retrained experts with the library's on development sets only (moerge/experts/select.py)."""
    from moerge.assets import ensure_base_model
    from moerge.experts.build import write_index
    from moerge.experts.bundled import LIBRARY
    from moerge.experts.select import choose
    if not candidates.is_dir():
        fail(f"no such folder: {candidates}")
    decisions = choose(ensure_base_model(get_settings()), LIBRARY, candidates, install=install, margin=margin,
                       log=lambda m: print(m, flush=True))
    if not decisions:
        fail(f"no finished experts in {candidates}")
    if install:
        write_index(LIBRARY)
    console.print(json.dumps(decisions, indent=2))


@experts_app.command("train-gate")
@_guard
def experts_train_gate(
    name: str,
    examples: Path = typer.Option(..., "--examples", help="JSONL of {\"prompt\": ..., \"answer\": ...}"),
    steps: int = typer.Option(100, "--steps"),
) -> None:
    """Train the PHATGOOSE gate of a registered LoRA from examples of its task."""
    from moerge.experts.gate_jobs import train_gate_for_card
    pool = _pool()
    rows = [json.loads(line) for line in examples.read_text().splitlines() if line.strip()]
    card = train_gate_for_card(pool, name, [r["prompt"] for r in rows], [r["answer"] for r in rows], steps=steps)
    console.print(f"trained gate of {card.name} ({steps} steps)")


@experts_app.command("train-joint")
@_guard
def experts_train_joint(
    per_recipe: int = typer.Option(16, "--per-recipe", help="training samples per task and recipe (template, "
                                   "content), besides each card's examples"),
    steps: int = typer.Option(200, "--steps", help="optimiser steps per module"),
    force: bool = typer.Option(False, "--force", help="retrain even when the current set matches the pool"),
) -> None:
    """Train the pool's joint gate set (the `joint` router): one classifier over all LoRA experts per layer input."""
    from moerge.assets import ensure_base_model
    from moerge.experts.joint_gates import ensure_joint
    s = get_settings()
    base = ensure_base_model(s)
    jg = ensure_joint(_pool(), base, s.home / "joint-gates", force=force, per_recipe=per_recipe, steps=steps,
                      progress=lambda m: err.print(m, highlight=False))
    console.print(f"joint gate set {jg.version[:16]}: {len(jg.experts)} experts, {len(jg.gates)} modules, "
                  f"dev {jg.meta.get('dev')}")


@experts_app.command("build-esft")
@_guard
def experts_build_esft(
    task: str,
    name: Optional[str] = typer.Option(None, "--name", help="expert name (default: esft-TASK)"),
    steps: int = typer.Option(100, "--steps"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="cumulative affinity p (default: "
                                              "ESFT's, 0.2 for token, 0.1 for gate)"),
    metric: str = typer.Option("token", "--metric", help="token (token selection ratio) | gate (average gate score)"),
    max_per_layer: Optional[int] = typer.Option(None, "--max-per-layer", help="at most this many experts a layer"),
    out: Optional[Path] = typer.Option(None, "--out", help="adapter folder (default: runs/esft/NAME)"),
    register: bool = typer.Option(True, "--register/--no-register", help="register it in the pool afterwards"),
) -> None:
    """Fine-tune the experts of the pool's MoE base that TASK routes to most (ESFT) and save them as an adapter."""
    from moerge.experts.card import check_name
    from moerge.moe.base import require_moe
    from moerge.moe.esft_train import EsftConfig, build_esft
    from moerge.tasks import get_task
    try:
        t = get_task(task)
    except KeyError as e:
        fail(str(e.args[0]))
    name = check_name(name or f"esft-{task}")
    s = get_settings()
    pool = _pool() if register else None
    if pool is not None:
        pool._ensure_free(name)
    base = require_moe(s.pool_path)
    cfg = EsftConfig(task=task, metric=metric, threshold=threshold, max_per_layer=max_per_layer, steps=steps)
    folder = out or Path("runs") / "esft" / name
    manifest = build_esft(base, cfg, folder, progress=lambda m: err.print(m, highlight=False))
    console.print(f"ESFT adapter for {task}: {manifest['n_experts']} experts over {len(manifest['experts'])} layers, "
                  f"{manifest['adapter_bytes'] / 2**20:.1f} MiB, dev accuracy {manifest['dev_acc']:.3f} -> {folder}")
    if pool is not None:
        examples = [smp.prompt for smp in t.samples(5, 99, "train")]
        card = pool.register_esft(folder, name, t.description, tags=t.tags, examples=examples)
        console.print(f"registered [bold]{card.name}[/] (esft on {card.base_model}, {len(card.artifacts)} artifacts)")


@experts_app.command("add-esft")
@_guard
def experts_add_esft(
    folder: Path,
    name: str = typer.Option(..., "--name"),
    description: str = typer.Option("", "--description"),
    example: list[str] = typer.Option([], "--example", help="an example prompt (repeatable)"),
    tag: list[str] = typer.Option([], "--tag"),
) -> None:
    """Register an ESFT adapter folder (esft_config.json + esft_model.safetensors) trained on the current MoE base."""
    card = _pool().register_esft(folder, name, description, tags=tag, examples=example)
    info = card.extra["esft"]
    console.print(f"registered [bold]{card.name}[/] (esft on {card.base_model}: {info['experts']} experts over "
                  f"{info['layers']} layers, {len(card.artifacts)} artifacts)")


@app.command()
@_guard
def route(prompt: str, method: str = typer.Option("glider-global", "--method", "-m"),
          as_json: bool = typer.Option(False, "--json"), task: Optional[str] = typer.Option(None, "--task")) -> None:
    """Show which experts a routing method picks for PROMPT."""
    from moerge.router.base import make_router
    ctx = _router_context()
    decision = make_router(method, ctx).route(prompt, task=task)
    data = decision.to_json()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table("expert", "score", title=f"{method}: " + ("abstain (base model)" if decision.abstained
                                                             else ", ".join(decision.chosen[:4])))
    for e in data["experts"][:8]:
        table.add_row(e["name"], f"{e['score']:.4f}")
    console.print(table)
    if decision.instruction:
        console.print(f"instruction: {decision.instruction}")


def _system(executor: str = "reference"):
    """The configured pool and routers, on the reference engine (starts in seconds, no vLLM)."""
    from moerge.startup import start
    return start(get_settings(), executor=executor, progress=lambda m: err.print(m))


def _router_context():
    return _system().router_ctx


@app.command()
@_guard
def calibrate(out: Optional[Path] = typer.Option(None, "--out", help="default: the bundled calibration file "
                                                 "(with --from-feedback: POOL/feedback_calibration.json)"),
              alpha: bool = typer.Option(True, "--alpha/--no-alpha",
                                         help="also choose glider's α on held-in development prompts"),
              from_feedback: bool = typer.Option(False, "--from-feedback",
                                                 help="fold the feedback stored in the pool into per-expert "
                                                 "priors and thresholds for the `feedback` router"),
              min_count: int = typer.Option(5, "--min-count", help="with --from-feedback: feedbacks an expert "
                                            "needs before its threshold is set")) -> None:
    """Calibrate abstain thresholds (out-of-domain calibration half vs in-domain prompts) and glider's α;
    or, with --from-feedback, the `feedback` router's per-expert priors and thresholds."""
    if from_feedback:
        _calibrate_from_feedback(out, min_count)
        return
    from moerge.tasks import out_of_domain_prompts
    from moerge.router.calibrate import calibrate as run
    from moerge.router.calibrate import calibrate_alpha
    from moerge.router.context import CALIBRATION_FILE
    system = _system()
    ctx = system.router_ctx
    cal = run(ctx, out_of_domain_prompts())
    for m, thr in cal.thresholds.items():
        console.print(f"{m}: threshold {thr:.4f}  {cal.detail[m]}")
    if alpha:
        ctx.calibration = cal          # glider reads the fresh glider-global threshold

        def answer(router, prompts, params):
            ids = [system.encode([{"role": "user", "content": p}]) for p in prompts]
            plans = [system.plan(router.route(p)) for p in prompts]
            return [g.text for g in system.generate_many(ids, params, plans)]

        tok = system.local[-1].tokenizer
        cal.alpha, cal.detail["glider_alpha"] = calibrate_alpha(ctx, answer, tok, progress=err.print)
        console.print(f"glider: α = {cal.alpha}  {cal.detail.get('glider_alpha')}")
    else:
        cal.alpha = ctx.calibration.alpha
        if "glider_alpha" in ctx.calibration.detail:
            cal.detail["glider_alpha"] = ctx.calibration.detail["glider_alpha"]
    cal.save(out or CALIBRATION_FILE)


def _calibrate_from_feedback(out: Optional[Path], min_count: int) -> None:
    """Reads only the registry: no engine, no model."""
    from moerge.experts.registry import Registry
    from moerge.router.feedback import CALIBRATION_NAME, FeedbackCalibration, FeedbackStore
    s = get_settings()
    registry = Registry(s.registry_url, busy_timeout_s=s.registry_busy_timeout_s)
    try:
        items = FeedbackStore(registry).items()
    finally:
        registry.close()
    cal = FeedbackCalibration.from_items(items, min_count=min_count)
    path = out or Path(s.pool_path) / CALIBRATION_NAME
    cal.save(path)
    for arm, st in sorted(cal.arms.items()):
        thr = "-" if st.threshold is None else f"{st.threshold:.4f}"
        console.print(f"{arm}: {st.n} feedbacks, success {st.successes:g}, prior {st.prior:.3f}, threshold {thr}")
    console.print(f"{len(items)} feedbacks -> {path}")


@app.command("eval")
@_guard
def eval_cmd(
    methods: Optional[list[str]] = typer.Option(None, "--methods", help="method labels (default: all)"),
    tasks: Optional[list[str]] = typer.Option(None, "--tasks", help="tasks (default: held-in + held-out)"),
    n: int = typer.Option(50, "--n", help="evaluation prompts per task"),
    quick: bool = typer.Option(False, "--quick", help="n=4, no alpha sweep, no best-single search"),
    out: Path = typer.Option(Path("runs/eval"), "--out"),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="score an OpenAI-compatible endpoint instead"),
    model: str = typer.Option("auto", "--model", help="model name to send to --endpoint"),
    api_key: str = typer.Option("none", "--api-key"),
    engine: str = typer.Option("auto", "--engine", help="auto: vLLM (fp32) for every plan it runs (base, adapters, "
                               "token and static mixtures), the reference engine for TIES | reference: everything "
                               "in the reference engine"),
    dtype: str = typer.Option("auto", "--dtype", help="vLLM's dtype: auto (bfloat16 where the CPU has native bf16, "
                              "else float32) | bfloat16 | float32 (greedy tokens equal the reference engine's)"),
    shift: str = typer.Option("both", "--shift", help="template: unseen phrasings of the template lists' content | "
                              "content: unseen phrasings of content no expert trained on | both"),
    feedback_curve: bool = typer.Option(False, "--feedback-curve", help="stream training prompts to the `feedback` "
                                        "router with the scorer's feedback, and measure on fresh evaluation prompts "
                                        "every --every feedbacks (a learning curve; --n prompts per task)"),
    feedbacks: int = typer.Option(20, "--feedbacks", help="--feedback-curve: feedbacks per task"),
    every: int = typer.Option(5, "--every", help="--feedback-curve: measure after every this many feedbacks"),
    explore_k: int = typer.Option(3, "--explore-k", help="--feedback-curve: the feedback router explores the "
                                  "wrapped router's top k experts plus base (0: every expert)"),
    feedback_kind: str = typer.Option("score", "--feedback-kind", help="--feedback-curve: score (the scorer's "
                                      "score of the answer) | correction (the reference answer: every expert and "
                                      "the base model are replayed and scored against it)"),
    best_single: bool = typer.Option(True, "--best-single/--no-best-single",
                                     help="search the best single expert per held-out and composed task "
                                     "(every expert on every such prompt; off with --quick)"),
) -> None:
    """Evaluate routing methods side by side (or an OpenAI-compatible endpoint)."""
    if feedback_curve:
        _feedback_curve(tasks, n, out, engine, dtype, "template" if shift == "both" else shift, feedbacks, every,
                        explore_k, feedback_kind)
        return
    if shift not in ("template", "content", "both"):
        fail(f"--shift must be template, content or both, not {shift!r}")
    shifts = ("template", "content") if shift == "both" else (shift,)
    if engine not in ("auto", "reference"):
        fail(f"--engine must be auto or reference, not {engine!r}")
    from moerge.tasks import HELD_IN, HELD_OUT, get_task
    task_list = list(tasks) if tasks else HELD_IN + HELD_OUT
    for t in task_list:
        get_task(t)
    if quick:
        n = min(n, 4)
    if endpoint:
        from moerge.eval.endpoint import evaluate_endpoint
        evaluate_endpoint(endpoint, model, task_list, n, out, api_key=api_key, shifts=shifts)
        console.print(f"wrote {out / 'report.md'}")
        return
    from moerge.eval.harness import default_methods, evaluate
    from moerge.eval.run import prepare
    specs = default_methods(quick)
    if methods:
        known = {s.label: s for s in specs}
        unknown = [m for m in methods if m not in known]
        if unknown:
            fail(f"unknown method(s) {unknown}: choose from {', '.join(known)}")
        specs = [known[m] for m in methods]
    from moerge.compute import check_dtype
    try:
        check_dtype(dtype)
    except ValueError as e:
        fail(f"--dtype: {e}")
    system, namespace = prepare(get_settings(), engine=engine, dtype=dtype, progress=lambda m: err.print(m),
                                moe=any(s.method == "moe" for s in specs), joint=any(s.method == "joint" for s in specs))
    try:
        report = evaluate(system, methods=specs, tasks=task_list, n=n, out=out,
                          cache_path=out / "generations.sqlite", namespace=namespace, with_best_single=best_single and not quick,
                          shifts=shifts)
    finally:
        system.shutdown()
    from moerge.eval.report import results_table
    console.print(results_table(report))
    console.print(f"wrote {out / 'report.md'} and plots")


def _feedback_curve(tasks, n, out, engine, dtype, shift, feedbacks, every, explore_k, kind="score") -> None:
    from moerge.eval.feedback import DEFAULT_CHECK_TASKS, feedback_curve
    from moerge.eval.run import prepare
    from moerge.tasks import HELD_OUT, get_task
    if shift not in ("template", "content"):
        fail(f"--shift must be template or content with --feedback-curve, not {shift!r}")
    if kind not in ("score", "correction"):
        fail(f"--feedback-kind must be score or correction, not {kind!r}")
    task_list = list(tasks) if tasks else HELD_OUT + list(DEFAULT_CHECK_TASKS)
    for t in task_list:
        get_task(t)
    system, namespace = prepare(get_settings(), engine=engine, dtype=dtype, progress=lambda m: err.print(m))
    try:
        report = feedback_curve(system, tasks=task_list, feedbacks=feedbacks, every=every, n=n, shift=shift, out=out,
                                cache_path=out / "generations.sqlite", namespace=namespace, explore_k=explore_k,
                                progress=err.print, kind=kind)
    finally:
        system.shutdown()
    for t, a in report["aim"]["per_task"].items():
        console.print(f"{t}: {100 * a['final']:.1f}% after {feedbacks} feedbacks, best single "
                      f"{100 * a['best_single']:.1f}%: {'met' if a['met'] else 'missed'}")
    console.print(f"aim {'met' if report['aim']['met'] else 'missed'}; wrote {out / 'feedback_curve.json'} and "
                  f"{out / 'feedback_curve.png'}")


moe_app = typer.Typer(no_args_is_help=True, help="The shared MoE base: build it from the pool's LoRA experts, list versions.")
app.add_typer(moe_app, name="moe")


@moe_app.command("build")
@_guard
def moe_build(
    expert: Optional[list[str]] = typer.Option(None, "--expert", "-e", help="LoRA experts to upcycle (default: all)"),
    top_k: int = typer.Option(2, "--top-k", help="experts per token"),
    router_init: str = typer.Option("hidden", "--router-init", help="hidden (card examples' hidden states) | gates"),
    no_base_expert: bool = typer.Option(False, "--no-base-expert", help="leave the plain base MLP out"),
    no_current: bool = typer.Option(False, "--no-current", help="keep serving the current MoE base"),
) -> None:
    """Upcycle the base model and the pool's LoRA experts into an MoE base (a Mixtral checkpoint) in the pool."""
    from moerge.assets import ensure_base_model
    from moerge.experts.pool import open_pool
    from moerge.moe.build import build_moe
    s = get_settings()
    pool = open_pool(s)
    try:
        base = build_moe(pool, ensure_base_model(s, progress=lambda m: err.print(m)), list(expert) if expert else None,
                         include_base=not no_base_expert, top_k=top_k, router_init=router_init,
                         make_current=not no_current, progress=lambda m: err.print(m))
    finally:
        pool.close()
    console.print(f"{base.id}: {base.n_experts} experts ({', '.join(base.experts)}), top-{base.top_k} -> {base.path}")


@moe_app.command("list")
@_guard
def moe_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """The MoE bases in the pool; * marks the one served and trained against."""
    from moerge.moe.base import current_moe, list_moe
    root = get_settings().pool_path
    cur = current_moe(root)
    rows = [{"id": b.id, "current": cur is not None and b.version == cur.version, "experts": list(b.experts),
             "top_k": b.top_k, "router_init": b.router_init, "path": str(b.path)} for b in list_moe(root)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("no MoE base: build one with `moerge moe build`")
    for r in rows:
        console.print(f"{'*' if r['current'] else ' '} {r['id']}  top-{r['top_k']}  {', '.join(r['experts'])}")


@app.command()
@_guard
def chat(prompt: str, model: str = typer.Option("auto", "--model", "-m", help="auto | base | moerge:<method> | expert"),
         max_tokens: int = typer.Option(128, "--max-tokens"), url: Optional[str] = typer.Option(
             None, "--url", help="a running moerge server (default: answer in this process)"),
         api_key: str = typer.Option("none", "--api-key"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Answer PROMPT and show the routing decision."""
    messages = [{"role": "user", "content": prompt}]
    if url:
        import httpx
        r = httpx.post(url.rstrip("/") + "/v1/chat/completions", timeout=600,
                       headers={"Authorization": f"Bearer {api_key}"},
                       json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
        if r.status_code != 200:
            fail(f"{r.status_code}: {r.json().get('error', {}).get('message', r.text)}")
        body = r.json()
        text, info = body["choices"][0]["message"]["content"], body.get("moerge", {})
    else:
        from moerge.models.generation import SamplingParams
        from moerge.service.factory import build_runtime
        runtime = build_runtime(get_settings(), progress=lambda m: err.print(m))
        plan = runtime.plan(model, messages)
        text = runtime.generate(messages, SamplingParams(max_tokens=max_tokens, temperature=0.0), plan).text
        info = plan.info()
    if as_json:
        print(json.dumps({"answer": text, "moerge": info}, indent=2))
        return
    console.print(text)
    chosen = ", ".join(info.get("chosen") or []) or "base model"
    err.print(f"[dim]routing: {info.get('method')} -> {chosen} ({info.get('routing_ms', 0):.1f} ms)[/]")


@app.command()
@_guard
def serve(host: Optional[str] = typer.Option(None), port: Optional[int] = typer.Option(None),
          executor: Optional[str] = typer.Option(None, help="vllm | servers | reference")) -> None:
    """Start the OpenAI-compatible service."""
    import uvicorn

    from moerge.service.factory import build_runtime
    from moerge.service.app import create_app

    s = get_settings()
    if executor:
        s = s.model_copy(update={"executor": executor})
    runtime = build_runtime(s, progress=lambda m: err.print(m))
    try:
        uvicorn.run(create_app(runtime), host=host or s.host, port=port or s.port, log_level="info")
    finally:      # uvicorn returns on SIGINT/SIGTERM: stop the vLLM engine processes with the server
        runtime.system.shutdown()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
