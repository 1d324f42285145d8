"""The chat format of the released Moxin instruct models (the Tülu 3 format).

    <s><|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{reply}</s>\\n ...

Expressed as a Jinja `chat_template` so that `tokenizer.apply_chat_template` produces it, in
training, evaluation and chat alike. Each reply and its end-of-text token sit inside
`{% generation %}` markers: `apply_chat_template(..., return_assistant_tokens_mask=True)` then
marks exactly the tokens that SFT and DPO train on.
"""

from __future__ import annotations

import re

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant")
GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def chat_template_of(tokenizer) -> str:
    """The tokenizer's own chat template, else the Moxin one (the tokenizer is not modified)."""
    return getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation so far, ending with the assistant's turn opener."""
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template_of(tokenizer), tokenize=False,
                                         add_generation_prompt=True)
    # The template writes BOS itself; the tokenizer must not add a second one.
    return tokenizer.encode(text, add_special_tokens=False)


def render_conversation(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and, per token, 1 where it belongs to an assistant reply
    (the reply's text and its end-of-text token), else 0: the tokens a chat model is trained on."""
    template = chat_template_of(tokenizer)
    if not GENERATION_MARKER.search(template):
        raise ValueError("the tokenizer's chat template has no {% generation %} markers around assistant replies, "
                         "so the trained tokens cannot be told apart; remove its chat_template to use Moxin's")
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        raise ValueError("the chat template and the tokenizer both add a BOS token")
    return ids, mask
