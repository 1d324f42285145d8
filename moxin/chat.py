"""The chat format of the released Moxin instruct models (the Tülu 3 format).

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{reply}</s>\\n ...

Expressed as a Jinja `chat_template` so that `tokenizer.apply_chat_template` produces it, in
training, evaluation and chat alike.
"""

from __future__ import annotations

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def chat_template_of(tokenizer) -> str:
    """The tokenizer's own chat template, else the Moxin one (the tokenizer is not modified)."""
    return getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation so far, ending with the assistant's turn opener."""
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template_of(tokenizer), tokenize=False,
                                         add_generation_prompt=True)
    # The template writes BOS itself; the tokenizer must not add a second one.
    return tokenizer.encode(text, add_special_tokens=False)
