"""Our model as an lm-evaluation-harness `LM`, registered as model type `moxin`.

Tokenisation follows lm-eval's `HFLM` exactly (same context/continuation split, same BOS
handling, same left truncation, same rolling windows), so per-request log-likelihoods, and
therefore accuracies, match HFLM on the same weights. What differs is the arithmetic:

- requests whose model input is identical (the choices " A"/" B"/" C"/" D" of MMLU, every
  one-token answer) are run once and scored together;
- only the continuation positions go through the LM head and the log-softmax, where HFLM
  computes (batch, length, vocab) logits for every position.

Log-softmax is always taken in float32. HFLM takes it in the model's dtype unless given
softmax_dtype="float32", so with bf16 weights compare against HFLM(..., softmax_dtype="float32").
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from moxin.chat import chat_template_of
from moxin.generate import generate, inference_context
from moxin.model import Transformer

log = logging.getLogger(__name__)

# ((context, continuation) or None, context token ids, continuation token ids): lm-eval's request triple
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


@register_model("moxin")
class MoxinLM(TemplateLM):
    """lm-eval model backed by a moxin `Transformer`.

    From lm-eval: `--model moxin --model_args ckpt=PATH[,batch_size=16,max_length=4096]` where
    PATH is a Hugging Face folder, a run folder or a Lightning .ckpt. From Python: pass a loaded
    `model=` and `tokenizer=` (the evaluation callback does this during training).
    """

    def __init__(self, ckpt: str | None = None, model: Transformer | None = None, tokenizer=None,
                 tokenizer_name: str = "mistral_v1", batch_size: int | str = 16, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, device: str | None = None,
                 add_bos_token: bool | None = None, seed: int = 1234, **unused):
        super().__init__()
        if unused:
            log.warning("moxin LM ignores model_args %s", sorted(unused))
        if (ckpt is None) == (model is None):
            raise ValueError("MoxinLM needs exactly one of ckpt=PATH or model=Transformer")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device=%s requested (lm-eval's command line default) but CUDA is unavailable: using cpu",
                        device)
            device = "cpu"
        if model is None:
            from moxin.checkpoint import load_model, tokenizer_for

            model = load_model(ckpt, device or "cpu")
            tokenizer = tokenizer or tokenizer_for(ckpt, tokenizer_name)
        elif device is not None:
            model = model.to(device)
        if tokenizer is None:
            from moxin.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_name)
        self.model, self.tokenizer = model, tokenizer
        self._device = next(model.parameters()).device
        if str(batch_size).startswith("auto"):
            batch_size = max_batch_size or 16  # no probing: sequences are sorted longest first instead
            log.info("batch_size=auto: using %d", batch_size)
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or model.config.max_seq_len)
        if self._max_length > model.config.max_seq_len:
            raise ValueError(f"max_length {self._max_length} exceeds the model's max_seq_len "
                             f"{model.config.max_seq_len}")
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.seed, self._batches_sampled = int(seed), 0

    # -- what lm-eval asks of a model -------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "moxin")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As HFLM: the tokenizer's own BOS policy, and no second BOS on text that starts with one."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return chat_template_of(self.tokenizer) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The same template as SFT training and `task=chat` (moxin/chat.py)."""
        return self.tokenizer.apply_chat_template(
            chat_history, chat_template=chat_template_of(self.tokenizer), tokenize=False,
            add_generation_prompt=add_generation_prompt, continue_final_message=not add_generation_prompt)

    # -- scoring ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), whether greedy decoding reproduces it) per request."""
        # The model input of a request is context + continuation minus the last token, left-truncated.
        by_input: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError(f"request {i}: empty context or continuation after tokenisation")
            if len(continuation) > self.max_length:
                raise ValueError(f"request {i}: continuation of {len(continuation)} tokens exceeds "
                                 f"max_length {self.max_length}")
            by_input[tuple((context + continuation)[-(self.max_length + 1):][:-1])].append(i)
        inputs = sorted(by_input, key=len, reverse=True)  # longest first: little padding, OOM early

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="moxin loglikelihood")
        with inference_context(self.model):
            for start in range(0, len(inputs), self.batch_size):
                batch = inputs[start:start + self.batch_size]
                hidden = self._hidden_states(batch)  # (B, T, dim)
                rows, positions, targets, owners = [], [], [], []
                for row, key in enumerate(batch):
                    for i in by_input[key]:
                        continuation = requests[i][2]
                        n = len(continuation)
                        rows += [row] * n
                        positions += range(len(key) - n, len(key))
                        targets += continuation
                        owners.append((i, n))
                picked = hidden[torch.tensor(rows), torch.tensor(positions)]  # (N, dim): continuations only
                logprobs = self.model.output(picked).float().log_softmax(dim=-1)
                targets_t = torch.tensor(targets, device=logprobs.device)
                token_logp = logprobs.gather(1, targets_t[:, None]).squeeze(1).tolist()
                greedy = (logprobs.argmax(dim=-1) == targets_t).tolist()
                offset = 0
                for i, n in owners:
                    results[i] = (float(sum(token_logp[offset:offset + n])), all(greedy[offset:offset + n]))
                    self._cache_answer(requests[i][0], results[i])
                    offset += n
                progress.update(len(owners))
        progress.close()
        return results

    def _hidden_states(self, inputs: list[tuple[int, ...]]) -> torch.Tensor:
        """Right-padded batch: causal attention keeps the padding out of every real position."""
        tokens = torch.full((len(inputs), len(inputs[0])), self.eot_token_id, dtype=torch.long)
        for row, ids in enumerate(inputs):
            tokens[row, :len(ids)] = torch.tensor(ids)
        return self.model.hidden_states(tokens.to(self.device))

    def _cache_answer(self, request: tuple[str, str] | None, answer: tuple[float, bool]) -> None:
        if request is not None:  # rolling windows are cached per document instead
            self.cache_hook.add_partial("loglikelihood", request, answer)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in windows of max_length tokens (HFLM's windows).

        Each window is scored in one forward pass in which every token attends to at most
        sliding_window earlier tokens, as the model was trained.
        """
        windows, owner = [], []
        for doc, (text,) in enumerate(req.args for req in requests):
            pairs = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                              max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owner.append(doc)
        totals = [0.0] * len(requests)
        for doc, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[doc] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations cut at the first stop sequence."""
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = defaultdict(list)  # requests with equal generation settings
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        out: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="moxin generate_until")
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} must be below max_length {self.max_length}")
            sampling = self._sampling(kwargs)
            prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in members}
            order = sorted(members, key=lambda i: len(prompts[i]), reverse=True)
            # The weights do not change during evaluation: packed once for all of the group's batches.
            with inference_context(self.model, new_tokens=max_new):
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    self._batches_sampled += 1  # a new seed per batch: repeated samples must differ
                    result = generate(self.model, [prompts[i] for i in chunk], max_new_tokens=max_new,
                                      stop=[self.eot_token_id, *until], tokenizer=self.tokenizer,
                                      seed=self.seed + self._batches_sampled, **sampling)
                    for i, tokens in zip(chunk, result.tokens, strict=True):
                        text = postprocess_generated_text(
                            self.tokenizer.decode(tokens, skip_special_tokens=True), stop=until, think_end_token=None)
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    progress.update(len(chunk))
        progress.close()
        return out

    def _sampling(self, kwargs: dict) -> dict:
        """Greedy unless the task samples; sampling defaults as transformers' generate (temperature 1,
        top-k 50, top-p 1). Settings generate() does not implement are refused, not ignored."""
        unknown = sorted(set(kwargs) - {"do_sample", "temperature", "top_p", "top_k"})
        if unknown:
            raise ValueError(f"the moxin model cannot apply generation settings {unknown}; "
                             "it implements do_sample, temperature, top_p, top_k, until and max_gen_toks")
        if not kwargs.get("do_sample"):
            return {"temperature": 0.0}
        temperature = kwargs.get("temperature")
        return {"temperature": 1.0 if temperature is None else float(temperature),
                "top_p": float(kwargs.get("top_p") or 1.0), "top_k": int(kwargs.get("top_k", 50) or 0)}
