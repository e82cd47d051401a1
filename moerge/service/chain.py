"""Serving a `chain` decision (router/chain.py): every step but the last runs here, in order, each on its
own plan (its expert, or the base model), greedily; each step after the first is routed again on its
real input first. The last step is then the request's ordinary generation, on the plan
`last_step_plan` gives, so it streams like any other answer. Each step's prompt and answer are
written into the decision's `detail["chain"]`, the routing explanation the client gets."""

from __future__ import annotations

import asyncio

from moerge.models.generation import SamplingParams
from moerge.plan import ExecutionPlan
from moerge.router.base import RoutingDecision
from moerge.router.chain import record_step, settle, step_decision, step_prompt


def last_step_plan(system, decision: RoutingDecision) -> ExecutionPlan:
    return system.plan(step_decision(decision.detail["chain"][-1]))


def step_messages(messages: list[dict], prompt: str) -> list[dict]:
    """The request's system turns, then the step's prompt as the one user turn (earlier turns are not
    the step's task)."""
    return [m for m in messages if m.get("role") == "system"] + [{"role": "user", "content": prompt}]


def _intermediate_params(params: SamplingParams) -> SamplingParams:
    # an intermediate answer is data for the next step: greedy, and never cut by the client's stop strings
    return SamplingParams(max_tokens=params.max_tokens, temperature=0.0)


async def arun_before_last(system, router, messages: list[dict], params: SamplingParams,
                           decision: RoutingDecision) -> list[dict]:
    """Run every step but the last; the last step's messages (its expert is `last_step_plan`'s)."""
    steps = decision.detail["chain"]
    answer = None
    for k, step in enumerate(steps):
        prompt = step_prompt(step, answer)
        if k > 0:
            await asyncio.to_thread(router.route_step, step, prompt)
        if k == len(steps) - 1:
            step["prompt"] = prompt
            break
        gen, plan = await system.agenerate(step_messages(messages, prompt), _intermediate_params(params),
                                           system.plan(step_decision(step)))
        answer = gen.text.strip()
        record_step(step, prompt, answer, plan.info())
        step["completion_tokens"] = gen.completion_tokens
    settle(decision)
    return step_messages(messages, steps[-1]["prompt"])


def run_before_last(system, router, messages: list[dict], params: SamplingParams,
                    decision: RoutingDecision) -> list[dict]:
    """`arun_before_last`, for the synchronous path."""
    steps = decision.detail["chain"]
    answer = None
    for k, step in enumerate(steps):
        prompt = step_prompt(step, answer)
        if k > 0:
            router.route_step(step, prompt)
        if k == len(steps) - 1:
            step["prompt"] = prompt
            break
        gen, plan = system.generate(step_messages(messages, prompt), _intermediate_params(params),
                                    system.plan(step_decision(step)))
        answer = gen.text.strip()
        record_step(step, prompt, answer, plan.info())
        step["completion_tokens"] = gen.completion_tokens
    settle(decision)
    return step_messages(messages, steps[-1]["prompt"])


def record_last(decision: RoutingDecision, text: str, plan: ExecutionPlan) -> None:
    last = decision.detail["chain"][-1]
    record_step(last, last["prompt"], text, plan.info())
