"""The chat prompt and warm-start target of the free-form math tasks (GSM8K, MATH).

As envs.countdown (GRPO-Zero's R1-Zero-style prompt): a system message, the question with the
format instructions as the user turn, and the assistant turn opened with RESPONSE_PROMPT, which
ends in "<think>"; the completion is what the model writes after it, and is rewarded by
envs.math_verify_reward (0.1 * format + correct).
"""
from __future__ import annotations

from envs.countdown import RESPONSE_PROMPT, SYSTEM_MESSAGE

USER_TEMPLATE = (
    "{question}\n"
    "Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, inside \\boxed{{}}, "
    "for example <answer> \\boxed{{42}} </answer>."
)

__all__ = ["SYSTEM_MESSAGE", "USER_TEMPLATE", "RESPONSE_PROMPT", "chat_prompt", "sft_completion"]


def chat_prompt(question: str) -> tuple[list[dict[str, str]], str]:
    """(messages, generation prefix): render the messages with a chat template and an open assistant
    turn, then append the prefix (RESPONSE_PROMPT, ending in "<think>")."""
    user = USER_TEMPLATE.format(question=question.strip())
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": user}], RESPONSE_PROMPT


def sft_completion(reasoning: str, gold: str) -> str:
    """Warm-start target after the prompt: "<reasoning></think>\\n<answer>\\boxed{<gold>}</answer>"
    (format 1, correct: reward 1.1)."""
    return f"{reasoning.strip()}</think>\n<answer>\\boxed{{{gold}}}</answer>"
