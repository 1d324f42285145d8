"""Tasks that talk to a trained model: `task=generate` (one prompt) and `task=chat` (multi-turn)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from omegaconf import DictConfig

from moxin.chat import chat_prompt
from moxin.checkpoint import load_model, tokenizer_for
from moxin.generate import generate, inference_context
from moxin.system import configure_cpu, inference_device


class TextStream:
    """Prints the text of new tokens as they arrive. SentencePiece spacing depends on the
    neighbouring tokens, so prompt + new tokens are decoded together and only the new suffix
    is printed."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer, self.tokens = tokenizer, list(prompt_ids)
        self.printed = tokenizer.decode(self.tokens, skip_special_tokens=True)

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.startswith(self.printed):  # else a multi-byte character is still incomplete
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

def _setup(cfg: DictConfig):
    if not cfg.ckpt:
        raise ValueError(f"task={cfg.task} needs ckpt=PATH (a Hugging Face folder, a run folder or a .ckpt)")
    device = inference_device(cfg.hardware.accelerator)
    configure_cpu(cfg.hardware.get("tune_cpu_allocator", False), cfg.hardware.get("onednn_linears", False))
    return load_model(cfg.ckpt, device).eval(), tokenizer_for(cfg.ckpt, cfg.data.tokenizer)

def _generate(model, tokenizer, prompt_ids: list[int], gen: DictConfig):
    start = time.perf_counter()
    out = generate(model, [prompt_ids], max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                   top_p=gen.top_p, top_k=gen.top_k, stop=[tokenizer.eos_token_id], seed=gen.seed,
                   callback=TextStream(tokenizer, prompt_ids))
    return out.tokens[0], time.perf_counter() - start

def generate_task(cfg: DictConfig) -> dict:
    """`python run.py task=generate ckpt=PATH prompt="..."`: stream a continuation of the prompt."""
    if cfg.prompt is None:
        raise ValueError('task=generate needs prompt="..."')
    model, tokenizer = _setup(cfg)
    prompt_ids = [tokenizer.bos_token_id] + tokenizer.encode(cfg.prompt, add_special_tokens=False)
    print(cfg.prompt, end="")
    tokens, seconds = _generate(model, tokenizer, prompt_ids, cfg.generation)
    print()
    text = tokenizer.decode(prompt_ids + tokens, skip_special_tokens=True)
    return {"text": text, "new_tokens": len(tokens), "tokens_per_s": len(tokens) / max(seconds, 1e-9)}

def chat_task(cfg: DictConfig, read: Callable[[str], str] = input) -> dict:
    """`python run.py task=chat ckpt=PATH`: a multi-turn conversation on the terminal.

    An empty line or end of input ends it; `generation.system` sets an optional system message.
    """
    model, tokenizer = _setup(cfg)
    messages = [{"role": "system", "content": cfg.generation.system}] if cfg.generation.get("system") else []
    # The weights stay fixed for the whole conversation: packed once (CPU, oneDNN), not every turn.
    with inference_context(model, new_tokens=cfg.generation.max_new_tokens):
        _converse(model, tokenizer, messages, cfg.generation, read)
    return {"messages": messages, "turns": sum(m["role"] == "user" for m in messages)}

def _converse(model, tokenizer, messages: list[dict], gen: DictConfig, read: Callable[[str], str]) -> None:
    """The turns of chat_task, appended to messages until the user ends the conversation."""
    while True:
        try:
            user = read("user> ").strip()
        except EOFError:
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        print("assistant> ", end="")
        tokens, _ = _generate(model, tokenizer, chat_prompt(tokenizer, messages), gen)
        print()
        reply = tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply.strip()})
