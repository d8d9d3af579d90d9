"""The prompt as the model is given it, shared by the evaluation harness and the tiny model's
training data (which is why it lives below both).

The public harness replaces the task's answer cue with an instruction before
generating; the bundled tiny task is GSM8K-shaped and gets the same rewrite, so the
tiny model is trained on exactly the strings it is evaluated on.
"""
from __future__ import annotations

REASONING_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# task-name prefix -> the cue the public harness replaces
ANSWER_CUES = {"gsm8k": "Answer:", "minerva_math": "Solution:", "tiny_gsm": "Answer:"}


def answer_cue(task_name: str | None) -> str | None:
    if not task_name:
        return None
    for prefix, cue in ANSWER_CUES.items():
        if task_name.startswith(prefix):
            return cue
    return None


def rewrite_prompt(task_name: str | None, context: str) -> str:
    """The public harness's rewrite: the answer cue becomes the reasoning instruction."""
    cue = answer_cue(task_name)
    return context.replace(cue, REASONING_INSTRUCTION) if cue else context
