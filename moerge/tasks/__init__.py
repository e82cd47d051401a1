"""The task suite (docs/TASKS.md): generators, templates and exact scorers, plus the out-of-domain set."""

from pathlib import Path

from moerge.tasks.base import Sample, Task, normalise
from moerge.tasks.suite import BY_NAME, COMPOSED, COMPOSED_STEPS, COMPOSED_TASKS, HELD_IN, HELD_OUT, TASKS, get_task


def out_of_domain_prompts() -> list[str]:
    path = Path(__file__).with_name("out_of_domain.txt")
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


__all__ = ["Sample", "Task", "normalise", "TASKS", "BY_NAME", "HELD_IN", "HELD_OUT", "COMPOSED", "COMPOSED_TASKS",
           "COMPOSED_STEPS", "get_task",
           "out_of_domain_prompts"]
