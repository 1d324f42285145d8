"""Chat records -> messages -> token ids with a loss mask, for SFT and DPO.

Schemas read (`schema: auto` tells them apart by field name):
  - `messages`: a list of {role, content} (the Tülu 3 SFT mixture, most local JSONL);
  - `conversations`: a list of {from, value} with from in human / gpt / system (Infinity Instruct);
  - preference pairs: `chosen` and `rejected`, each a message list in either shape (the Tülu 3
    preference mixture: the whole conversation, prompt included) or only the reply (a string or
    an assistant message list), with the prompt in `prompt` (a string or a message list).

A record that cannot become a correct example raises `Skip(reason)`; the caller counts it in
`ConversationStats` and goes on. Nothing is repaired silently: an empty turn, an unknown role or a
conversation without an assistant reply is never trained on with a guessed mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from moxin.chat import render_conversation
from moxin.losses import IGNORE_INDEX

SCHEMAS = ("auto", "messages", "conversations", "openthoughts", "openr1")
# The instruction DeepScaleR appends to each problem; reasoning SFT data, GRPO prompts and the tiny
# generated problems all use it, so the model sees one prompt format throughout.
REASONING_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
OVERFLOW_POLICIES = ("truncate", "drop")
SKIP_REASONS = ("bad_json", "not_an_object", "truncated_file", "missing_field", "not_a_list", "bad_message",
                "unknown_role", "empty_content", "no_assistant_turn", "prompt_mismatch", "identical_pair",
                "special_token_text", "no_verified_answer", "too_long")
# Role names of the schemas we read -> the chat template's roles.
ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


class Skip(Exception):
    """This record is skipped, for `reason` (one of SKIP_REASONS)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ConversationStats:
    """What reading a chat source produced: examples kept, truncated, tokens, and skips by reason."""

    records: int = 0
    kept: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add_reader_skips(self, reader_stats) -> None:
        """Fold in what the file reader skipped (bad JSON, truncated files, ...): a SourceStats."""
        for reason, count in reader_stats.skipped.items():
            if count:
                self.skipped[reason] = self.skipped.get(reason, 0) + count

    def as_dict(self) -> dict:
        return {"records": self.records, "kept": self.kept, "truncated": self.truncated, "tokens": self.tokens,
                "trained_tokens": self.trained_tokens, "skipped": {k: v for k, v in self.skipped.items() if v}}


def normalize_messages(raw) -> list[dict[str, str]]:
    """A message list in either schema as [{"role", "content"}] with the template's role names."""
    if not isinstance(raw, list) or not raw:
        raise Skip("not_a_list")
    messages = []
    for message in raw:
        if not isinstance(message, dict):
            raise Skip("bad_message")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise Skip("bad_message")
        if role.lower() not in ROLE_NAMES:
            raise Skip("unknown_role")
        if not content.strip():
            raise Skip("empty_content")
        messages.append({"role": ROLE_NAMES[role.lower()], "content": content})
    return messages


def openthoughts_reply(text: str) -> str:
    """OpenThoughts' <|begin_of_thought|> ... <|end_of_solution|> reply as <think>...</think> then the solution."""
    thought = re.search(r"<\|begin_of_thought\|>(.*?)<\|end_of_thought\|>", text, flags=re.DOTALL)
    solution = re.search(r"<\|begin_of_solution\|>(.*?)(<\|end_of_solution\|>|$)", text, flags=re.DOTALL)
    if not thought or not solution:
        return text
    return f"<think>\n{thought.group(1).strip()}\n</think>\n\n{solution.group(1).strip()}"


def _openthoughts(record: dict) -> list[dict[str, str]]:
    """OpenThoughts-114k: `conversations` (from/value). Its system prompt describes the markers this
    adapter replaces, so it is left out."""
    messages = normalize_messages(record.get("conversations"))
    return [{**m, "content": openthoughts_reply(m["content"])} if m["role"] == "assistant" else m
            for m in messages if m["role"] != "system"]


def _openr1(record: dict) -> list[dict[str, str]]:
    """OpenR1-Math-220k: the first of `generations` that math-verify marked correct (a DeepSeek-R1
    response with <think>...</think> and a \\boxed{} answer), after the `problem`; else `messages`."""
    generations, verified = record.get("generations"), record.get("correctness_math_verify")
    if isinstance(generations, list) and isinstance(verified, list) and isinstance(record.get("problem"), str):
        correct = [g for g, ok in zip(generations, verified, strict=False) if ok and isinstance(g, str)]
        if not correct:
            raise Skip("no_verified_answer")
        return normalize_messages([{"role": "user", "content": record["problem"]},
                                   {"role": "assistant", "content": correct[0]}])
    if record.get("messages") is None:
        raise Skip("missing_field")
    return normalize_messages(record["messages"])


def conversation_of(record: dict, schema: str = "auto") -> list[dict[str, str]]:
    """The messages of an SFT record."""
    if schema in ("openthoughts", "openr1"):
        messages = _openthoughts(record) if schema == "openthoughts" else _openr1(record)
        if not any(m["role"] == "assistant" for m in messages):
            raise Skip("no_assistant_turn")
        return messages
    if schema == "auto":
        schema = next((name for name in ("messages", "conversations") if name in record), "messages")
    if record.get(schema) is None:
        raise Skip("missing_field")
    messages = normalize_messages(record[schema])
    if not any(m["role"] == "assistant" for m in messages):
        raise Skip("no_assistant_turn")
    return messages


def _preference_side(value, prompt) -> list[dict[str, str]]:
    if value is None:
        raise Skip("missing_field")
    messages = [{"role": "assistant", "content": value}] if isinstance(value, str) else normalize_messages(value)
    if isinstance(value, str) and not value.strip():
        raise Skip("empty_content")
    if all(m["role"] == "assistant" for m in messages):  # only the reply: the prompt is a field of its own
        if prompt is None:
            raise Skip("missing_field")
        prompt_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) \
            else normalize_messages(prompt)
        if isinstance(prompt, str) and not prompt.strip():
            raise Skip("empty_content")
        messages = prompt_messages + messages
    return messages


def preference_of(record: dict) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(chosen, rejected) conversations of a preference record: the same prompt, then each reply."""
    prompt = record.get("prompt")
    chosen = _preference_side(record.get("chosen"), prompt)
    rejected = _preference_side(record.get("rejected"), prompt)
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise Skip("no_assistant_turn")
    if chosen[:-1] != rejected[:-1]:
        raise Skip("prompt_mismatch")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise Skip("identical_pair")
    return chosen, rejected


def _last_reply_only(mask: list[int]) -> list[int]:
    """The mask of the final assistant reply alone (DPO compares the last replies, not earlier turns)."""
    start = len(mask)
    while start > 0 and not mask[start - 1]:
        start -= 1
    while start > 0 and mask[start - 1]:
        start -= 1
    return [0] * start + list(mask[start:])


@dataclass
class TokenizedExample:
    """One conversation as model input and next-token labels (IGNORE_INDEX where not trained)."""

    input_ids: np.ndarray  # (L - 1,) int32
    labels: np.ndarray  # (L - 1,) int32

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def tokenize_conversation(tokenizer, messages, max_tokens: int, overflow: str,
                          last_reply_only: bool = False) -> tuple[TokenizedExample, bool]:
    """Render and tokenise; return the example and whether it was cut. A conversation over `max_tokens`
    is cut to its first max_tokens tokens (overflow=truncate) or skipped (drop); either way, one with
    no trained token left is skipped."""
    ids, mask = render_conversation(tokenizer, messages)
    replies = sum(m["role"] == "assistant" for m in messages)
    if ids.count(tokenizer.eos_token_id) != replies or (
            tokenizer.bos_token_id is not None and ids.count(tokenizer.bos_token_id) != 1):
        raise Skip("special_token_text")  # e.g. a literal "</s>" in a message: it would become a control token
    if last_reply_only:
        mask = _last_reply_only(mask)
    truncated = len(ids) > max_tokens
    if truncated:
        if overflow == "drop":
            raise Skip("too_long")
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    ids_array = np.asarray(ids, dtype=np.int32)
    labels = np.where(np.asarray(mask[1:], dtype=bool), ids_array[1:], IGNORE_INDEX).astype(np.int32)
    example = TokenizedExample(ids_array[:-1], labels)
    if example.trained_tokens == 0:
        raise Skip("too_long")  # the assistant's reply lay entirely past the limit
    return example, truncated
