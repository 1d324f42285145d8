"""Post-training data: chat sources -> tokenised conversations -> SFT rows or DPO pairs -> DataLoaders.

SFT packs several conversations into each row of `seq_len` tokens. `segments` says which
conversation each token belongs to: the model restarts positions at each conversation and keeps
attention inside it, and labels never cross from one conversation into the next. Each training
item also carries `step_tokens`, the number of trained tokens in its whole optimizer step (every
micro-batch, every rank), so the SFT loss is the sum of token losses over that number: the same
under any gradient accumulation and number of devices.

DPO serves (chosen, rejected) pairs, padded per batch; the chosen rows come first, then the
rejected ones, so the module runs both in one forward pass.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from moxin.chat import chat_prompt, chat_template_of
from moxin.data.conversations import (
    OVERFLOW_POLICIES,
    REASONING_INSTRUCTION,
    SCHEMAS,
    ConversationStats,
    Skip,
    TokenizedExample,
    conversation_of,
    preference_of,
    tokenize_conversation,
)
from moxin.data.datamodule import ResumableDataModule, _atomic_write
from moxin.data.pack import _progress_bar, is_validation
from moxin.data.sources import SourceConfig, SourceStats, iter_records, source_fingerprint
from moxin.data.synthetic import GENERATORS
from moxin.losses import IGNORE_INDEX
from moxin.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

FORMATS = ("sft", "preference", "prompts")
CHAT_KINDS = ("jsonl", "parquet", "hf", "synthetic")
CACHE_FORMAT = 1


@dataclass
class ChatSourceConfig:
    """One chat dataset: local jsonl/parquet, a Hugging Face dataset, or `synthetic` (made by code)."""

    name: str
    kind: str
    path: str | None = None  # file or folder (jsonl/parquet), dataset name (hf), generator (synthetic)
    schema: str = "auto"  # SFT records: messages | conversations | auto
    hf_config: str | None = None
    split: str = "train"
    data_files: list[str] | None = None
    streaming: bool = True
    max_examples: int | None = None  # records read at most
    num_examples: int = 1000  # synthetic: how many records to make
    seed: int = 0  # synthetic
    problem_field: str = "problem"  # prompts (GRPO): the question and its reference answer
    answer_field: str = "answer"

    def __post_init__(self) -> None:
        where = f"chat source {self.name!r}"
        if self.kind not in CHAT_KINDS:
            raise ValueError(f"{where}: kind must be one of {CHAT_KINDS}, got {self.kind!r}")
        if not self.path:
            raise ValueError(f"{where}: path is required (a file, folder, dataset name or generator)")
        if self.kind == "synthetic" and self.path not in GENERATORS:
            raise ValueError(f"{where}: synthetic path must be one of {sorted(GENERATORS)}, got {self.path!r}")
        if self.schema not in SCHEMAS:
            raise ValueError(f"{where}: schema must be one of {SCHEMAS}, got {self.schema!r}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"{where}: max_examples must be None or >= 1, got {self.max_examples}")

    def records(self, stats: SourceStats) -> Iterator[dict]:
        if self.kind == "synthetic":
            yield from GENERATORS[self.path](self.num_examples, self.seed)
            return
        reader = SourceConfig(name=self.name, kind=self.kind, path=self.path, hf_config=self.hf_config,
                              split=self.split, data_files=self.data_files, streaming=self.streaming)
        yield from iter_records(reader, stats)

    def fingerprint(self) -> dict:
        """What besides the config decides the records: the files, or the generating code."""
        if self.kind in ("jsonl", "parquet"):
            return source_fingerprint(SourceConfig(name=self.name, kind=self.kind, path=self.path))
        if self.kind == "synthetic":
            import inspect

            from moxin.data import synthetic

            return {"generator": hashlib.sha256(inspect.getsource(synthetic).encode()).hexdigest()[:16]}
        return {}


@dataclass
class ChatDataConfig:
    sources: list[ChatSourceConfig]
    format: str = "sft"  # sft: packed conversations; preference: (chosen, rejected) pairs for DPO;
    # prompts: problems with reference answers for GRPO (the problem + `instruction` as the user's turn)
    instruction: str | None = REASONING_INSTRUCTION
    tokenizer: str = "mistral_v1"
    seq_len: int = 4096  # tokens of a conversation (SFT: also of a packed row)
    micro_batch_size: int = 1  # rows (SFT) or pairs (preference) per device and micro-batch
    overflow: str = "truncate"  # a conversation over seq_len: truncate (keep its start) | drop
    pack: bool = True  # SFT: several conversations per row; false: one per row, padded
    epochs: int = 1
    val_fraction: float = 0.02
    val_max_sequences: int | None = 256
    seed: int = 1234
    num_workers: int = 0
    cache_dir: str | None = None  # tokenised conversations (and DPO reference log-probs), reused
    progress: bool = True
    tiny_sources: list | None = None  # offline stand-ins that +scale=tiny trains on instead of `sources`
    tiny_val_fraction: float | None = None  # +scale=tiny: val_fraction and val_max_sequences for them
    tiny_val_max_sequences: int | None = None
    warning: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.sources, Mapping):
            self.sources = [{"name": k, **dict(v)} for k, v in self.sources.items()]
        if not self.sources:
            raise ValueError("sources must list at least one chat source")
        self.sources = [s if isinstance(s, ChatSourceConfig) else ChatSourceConfig(**dict(s)) for s in self.sources]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"chat sources must have unique names, got {names}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {self.overflow!r}")
        for name in ("seq_len", "micro_batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


# --- reading and tokenising ---


@dataclass
class ExampleArrays:
    """Tokenised examples stored flat: example i is input_ids[offsets[i]:offsets[i + 1]] (and labels)."""

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_examples(cls, examples: list[TokenizedExample]) -> ExampleArrays:
        lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cat = (lambda parts: np.concatenate(parts).astype(np.int32)) if examples else \
            (lambda parts: np.zeros(0, dtype=np.int32))
        return cls(cat([e.input_ids for e in examples]), cat([e.labels for e in examples]), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.labels[a:b]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def read_chat_source(source: ChatSourceConfig, config: ChatDataConfig, tokenizer) -> tuple[dict, dict]:
    """Tokenise a source into {split: ExampleArrays} per side ("examples", or "chosen" + "rejected"),
    with its counts: kept, truncated, tokens, and every skipped record by reason."""
    stats, reader_stats = ConversationStats(), SourceStats()
    sides = ("examples",) if config.format == "sft" else ("chosen", "rejected")
    kept: dict[str, dict[str, list]] = {split: {side: [] for side in sides} for split in ("train", "val")}
    total = source.max_examples or (source.num_examples if source.kind == "synthetic" else None)
    with _progress_bar(config.progress, f"tokenising {source.name}", total) as advance:
        for record in source.records(reader_stats):
            stats.records += 1
            advance(1)
            try:
                conversations = ([conversation_of(record, source.schema)] if config.format == "sft"
                                 else list(preference_of(record)))
                results = [tokenize_conversation(tokenizer, messages, config.seq_len, config.overflow,
                                                 last_reply_only=config.format == "preference")
                           for messages in conversations]
            except Skip as skip:
                stats.skip(skip.reason)
            else:
                # Split by prompt, so that pairs (or answers) sharing a prompt never straddle train and validation.
                split = "val" if is_validation(json.dumps(conversations[0][:-1]), config.val_fraction) else "train"
                for side, (example, _) in zip(sides, results, strict=True):
                    kept[split][side].append(example)
                stats.kept += 1
                stats.truncated += any(truncated for _, truncated in results)
                stats.tokens += sum(len(example.input_ids) + 1 for example, _ in results)
                stats.trained_tokens += sum(example.trained_tokens for example, _ in results)
            if source.max_examples is not None and stats.records >= source.max_examples:
                break
    stats.add_reader_skips(reader_stats)
    arrays = {split: {side: ExampleArrays.from_examples(ex) for side, ex in by_side.items()}
              for split, by_side in kept.items()}
    return arrays, stats.as_dict()


def read_prompt_source(source: ChatSourceConfig, config: ChatDataConfig, tokenizer) -> tuple[dict, dict]:
    """Problems with reference answers as {split: (prompt ids as ExampleArrays, answers)}, with counts.
    A prompt is the chat template's user turn (problem, then the instruction) and the assistant opener."""
    stats, reader_stats = ConversationStats(), SourceStats()
    kept: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
    for record in source.records(reader_stats):
        stats.records += 1
        problem, answer = record.get(source.problem_field), record.get(source.answer_field)
        if problem is None or answer is None:
            stats.skip("missing_field")
            continue
        if not isinstance(problem, str) or not str(answer).strip() or not problem.strip():
            stats.skip("empty_content")
            continue
        content = f"{problem} {config.instruction}" if config.instruction else problem
        ids = chat_prompt(tokenizer, [{"role": "user", "content": content}])
        if len(ids) >= config.seq_len:
            stats.skip("too_long")  # a problem cannot be cut; seq_len must also leave room for the answer
            continue
        split = "val" if is_validation(problem, config.val_fraction) else "train"
        kept[split][0].append(TokenizedExample(np.asarray(ids, dtype=np.int32), np.zeros(len(ids), dtype=np.int32)))
        kept[split][1].append(str(answer))
        stats.kept += 1
        stats.tokens += len(ids)
        if source.max_examples is not None and stats.records >= source.max_examples:
            break
    stats.add_reader_skips(reader_stats)
    return {split: (ExampleArrays.from_examples(ex), answers) for split, (ex, answers) in kept.items()}, \
        stats.as_dict()


# --- SFT: packing ---


@dataclass
class PackedChat:
    """Rows of seq_len tokens: inputs, labels (IGNORE_INDEX where not trained) and segment ids."""

    input_ids: np.ndarray  # (rows, seq_len) int32
    labels: np.ndarray  # (rows, seq_len) int32
    segments: np.ndarray  # (rows, seq_len) int32: conversation number within the row; padding its own
    conversations: int = 0
    padding: int = 0  # positions that hold no conversation

    def trained_per_row(self) -> np.ndarray:
        return (self.labels != IGNORE_INDEX).sum(axis=1)


def pack_conversations(examples: ExampleArrays, seq_len: int, pad_id: int, pack: bool = True) -> PackedChat:
    """Best-fit decreasing: longest conversations first, each into the row it fills most tightly.
    With pack=False every conversation gets its own row. Leftover space is padding, never trained."""
    lengths = examples.lengths()
    if len(lengths) and lengths.max() > seq_len:
        raise ValueError(f"a conversation of {lengths.max()} tokens does not fit rows of {seq_len}")
    rows: list[list[int]] = []  # example ids per row
    free: list[tuple[int, int]] = []  # (space left, row id), sorted
    for i in np.argsort(-lengths, kind="stable"):
        need = int(lengths[i])
        at = bisect.bisect_left(free, (need, -1)) if pack else len(free)
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(int(i))
        if pack and space - need > 0:
            bisect.insort(free, (space - need, row))
    shape = (len(rows), seq_len)
    input_ids = np.full(shape, pad_id, dtype=np.int32)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int32)
    segments = np.zeros(shape, dtype=np.int32)
    for r, members in enumerate(rows):
        at = 0
        for segment, i in enumerate(sorted(members)):  # in reading order within the row
            ids, lab = examples[i]
            input_ids[r, at:at + len(ids)], labels[r, at:at + len(ids)] = ids, lab
            segments[r, at:at + len(ids)] = segment
            at += len(ids)
        segments[r, at:] = len(members)  # padding: a segment of its own
    return PackedChat(input_ids, labels, segments, conversations=len(lengths),
                      padding=len(rows) * seq_len - int(lengths.sum()))


def epoch_order(n: int, epochs: int, seed: int) -> np.ndarray:
    """`epochs` passes over 0..n-1, each in its own seeded order."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(n) for _ in range(epochs)]) if n else np.zeros(0, dtype=np.int64)


class StepAlignedDataset(Dataset):
    """Items in a fixed order, cut to whole optimizer steps once the step size is known."""

    def __init__(self, order: np.ndarray):
        self.full_order = order
        self.order = order
        self.dropped = 0  # items of the last, incomplete step: not served

    def fit_to_steps(self, items_per_step: int) -> None:
        """Serve whole optimizer steps only (items_per_step = micro-batch x micro-batches per step x
        data-parallel replicas),
        so the last step is as large as the others."""
        usable = len(self.full_order) // items_per_step * items_per_step
        if usable == 0:
            raise ValueError(f"{len(self.full_order)} training items do not fill one optimizer step of "
                             f"{items_per_step} (micro-batch x micro-batches per step x data-parallel "
                             "replicas); use more data or epochs")
        self.order = self.full_order[:usable]
        self.dropped = len(self.full_order) - usable

    def __len__(self) -> int:
        return len(self.order)


class PackedChatDataset(StepAlignedDataset):
    def __init__(self, packed: PackedChat, order: np.ndarray | None = None):
        super().__init__(np.arange(len(packed.input_ids)) if order is None else order)
        self.packed = packed
        self.trained = packed.trained_per_row()
        self.step_tokens: np.ndarray | None = None

    def fit_to_steps(self, items_per_step: int) -> None:
        super().fit_to_steps(items_per_step)
        self.step_tokens = self.trained[self.order].reshape(-1, items_per_step).sum(axis=1)
        self.items_per_step = items_per_step

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        row = int(self.order[position])
        item = {name: torch.from_numpy(getattr(self.packed, name)[row].astype(np.int64))
                for name in ("input_ids", "labels", "segments")}
        if self.step_tokens is not None:
            item["step_tokens"] = torch.tensor(float(self.step_tokens[position // self.items_per_step]))
        return item


# --- preference pairs ---


class PreferenceDataset(StepAlignedDataset):
    """(chosen, rejected) pairs; each item also carries its pair index (for cached reference log-probs)."""

    def __init__(self, chosen: ExampleArrays, rejected: ExampleArrays, order: np.ndarray | None = None):
        super().__init__(np.arange(len(chosen)) if order is None else order)
        self.chosen, self.rejected = chosen, rejected

    def pairs(self) -> int:
        return len(self.chosen)

    def __getitem__(self, position: int) -> dict[str, Any]:
        pair = int(self.order[position])
        return {"index": pair, "chosen": self.chosen[pair], "rejected": self.rejected[pair]}


class PromptDataset(StepAlignedDataset):
    """Problems for GRPO: the prompt's token ids and the reference answer."""

    def __init__(self, prompts: ExampleArrays, answers: list[str], order: np.ndarray | None = None):
        super().__init__(np.arange(len(prompts)) if order is None else order)
        self.prompts, self.answers = prompts, answers

    def __getitem__(self, position: int) -> dict[str, Any]:
        i = int(self.order[position])
        return {"index": i, "prompt_ids": self.prompts[i][0].tolist(), "answer": self.answers[i]}


def collate_prompts(items: list[dict]) -> dict[str, Any]:
    return {"index": torch.tensor([item["index"] for item in items]),
            "prompt_ids": [item["prompt_ids"] for item in items], "answers": [item["answer"] for item in items]}


def collate_pairs(items: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One batch of 2B rows, right-padded: the B chosen sequences, then the B rejected ones."""
    sequences = [item["chosen"] for item in items] + [item["rejected"] for item in items]
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.from_numpy(ids.astype(np.int64))
        labels[row, :len(lab)] = torch.from_numpy(lab.astype(np.int64))
    return {"input_ids": input_ids, "labels": labels, "index": torch.tensor([item["index"] for item in items])}


# --- the data modules ---


class ChatDataModule(ResumableDataModule):
    """Reads and tokenises every source once (or loads the cached result), then builds the datasets."""

    def __init__(self, config: ChatDataConfig, collate_fn=None):
        super().__init__(config.micro_batch_size, config.num_workers, collate_fn)
        self.config = config
        self.arrays: dict[str, dict[str, ExampleArrays]] = {}
        self.source_stats: dict[str, dict] = {}

    def prepare_data(self) -> None:
        if self.config.cache_dir is not None and not self.arrays:
            self.tokenizer = load_tokenizer(self.config.tokenizer)
            for source in self.config.sources:
                self._load_or_read(source)

    def _read_all(self) -> None:
        cfg = self.config
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        merged: dict[str, dict[str, list[ExampleArrays]]] = {}
        for source in cfg.sources:
            arrays, stats = self._load_or_read(source)
            self.source_stats[source.name] = stats
            for split, sides in arrays.items():
                for side, part in sides.items():
                    merged.setdefault(split, {}).setdefault(side, []).append(part)
        self.arrays = {split: {side: _concat(parts) for side, parts in sides.items()}
                       for split, sides in merged.items()}
        for split in ("train", "val"):
            first = next(iter(self.arrays[split].values()))
            if split == "train" and len(first) == 0:
                raise ValueError(f"the chat sources gave no training examples; read and skipped: {self.source_stats}")
            if split == "val" and cfg.val_max_sequences is not None and len(first) > cfg.val_max_sequences:
                keep = capped_sample(len(first), cfg.val_max_sequences, cfg.seed)
                self.arrays[split] = {side: _subset(a, keep) for side, a in self.arrays[split].items()}
        for name, stats in self.source_stats.items():
            if stats["skipped"] or stats["truncated"]:
                print(f"[data] {name}: kept {stats['kept']} of {stats['records']} records, truncated "
                      f"{stats['truncated']}, skipped {stats['skipped']}")

    def _load_or_read(self, source: ChatSourceConfig) -> tuple[dict, dict]:
        cfg = self.config
        folder = None
        if cfg.cache_dir is not None:
            folder = os.path.join(cfg.cache_dir, f"chat-{source.name}-{self._cache_key(source)}")
            if os.path.exists(os.path.join(folder, "meta.json")):
                return _read_chat_cache(folder)
        arrays, stats = read_chat_source(source, cfg, self.tokenizer)
        if folder is not None:
            _write_chat_cache(folder, arrays, stats)
        return arrays, stats

    def _cache_key(self, source: ChatSourceConfig) -> str:
        key = {"format": CACHE_FORMAT, "source": asdict(source), "fingerprint": source.fingerprint(),
               "tokenizer": self.config.tokenizer, "chat_template": chat_template_of(self.tokenizer),
               "seq_len": self.config.seq_len,
               "overflow": self.config.overflow, "val_fraction": self.config.val_fraction,
               "data_format": self.config.format}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def train_dataloader(self):
        if self.train_dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        # samples_per_step counts train_micro_batches: under the pipeline one loader batch is a whole step.
        self.train_dataset.fit_to_steps(self.samples_per_step())
        self.summary["train_items_dropped_to_fill_steps"] = self.train_dataset.dropped
        return super().train_dataloader()


class SFTDataModule(ChatDataModule):
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        cfg = self.config
        self._read_all()
        train = pack_conversations(self.arrays["train"]["examples"], cfg.seq_len, self.pad_id, cfg.pack)
        val = pack_conversations(self.arrays["val"]["examples"], cfg.seq_len, self.pad_id, cfg.pack)
        self.train_dataset = PackedChatDataset(train, epoch_order(len(train.input_ids), cfg.epochs, cfg.seed))
        self.val_dataset = PackedChatDataset(val)
        self.summary = {"format": "sft", "tokenizer": cfg.tokenizer, "seq_len": cfg.seq_len, "epochs": cfg.epochs,
                        "sources": self.source_stats, "train_conversations": train.conversations,
                        "train_rows": len(train.input_ids), "train_trained_tokens": int(train.trained_per_row().sum()),
                        "packing_efficiency": _fill(train), "val_conversations": val.conversations,
                        "val_rows": len(val.input_ids)}


class PreferenceDataModule(ChatDataModule):
    def __init__(self, config: ChatDataConfig):
        super().__init__(config)
        self.collate_fn = self._collate

    def _collate(self, items):
        return collate_pairs(items, self.pad_id)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        cfg = self.config
        self._read_all()
        train, val = self.arrays["train"], self.arrays["val"]
        self.train_dataset = PreferenceDataset(train["chosen"], train["rejected"],
                                               epoch_order(len(train["chosen"]), cfg.epochs, cfg.seed))
        self.val_dataset = PreferenceDataset(val["chosen"], val["rejected"])
        self.summary = {"format": "preference", "tokenizer": cfg.tokenizer, "seq_len": cfg.seq_len,
                        "epochs": cfg.epochs, "sources": self.source_stats, "train_pairs": len(train["chosen"]),
                        "val_pairs": len(val["chosen"])}

    def fingerprint(self) -> str:
        """A hash of every pair's tokens and labels (keys the reference log-prob cache)."""
        digest = hashlib.sha256()
        for split in ("train", "val"):
            for side in ("chosen", "rejected"):
                arrays = self.arrays[split][side]
                for part in (arrays.input_ids, arrays.labels, arrays.offsets):
                    digest.update(np.ascontiguousarray(part).tobytes())
        return digest.hexdigest()[:16]


class PromptDataModule(ChatDataModule):
    """GRPO's problems. Read without a cache (prompts are short); an optimizer step's batch is
    micro_batch_size prompts per device, each sampled group_size times by the module."""

    def __init__(self, config: ChatDataConfig):
        super().__init__(config, collate_fn=collate_prompts)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        cfg = self.config
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        splits: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
        for source in cfg.sources:
            arrays, self.source_stats[source.name] = read_prompt_source(source, cfg, self.tokenizer)
            for split, (prompts, answers) in arrays.items():
                splits[split][0].append(prompts)
                splits[split][1].extend(answers)
        (train, train_answers), (val, val_answers) = ((_concat(p), a) for p, a in splits.values())
        if len(train) == 0:
            raise ValueError(f"the prompt sources gave no training problems; read and skipped: {self.source_stats}")
        if cfg.val_max_sequences is not None and len(val) > cfg.val_max_sequences:
            keep = capped_sample(len(val), cfg.val_max_sequences, cfg.seed)
            val, val_answers = _subset(val, keep), [val_answers[i] for i in keep]
        self.train_dataset = PromptDataset(train, train_answers, epoch_order(len(train), cfg.epochs, cfg.seed))
        self.val_dataset = PromptDataset(val, val_answers)
        self.summary = {"format": "prompts", "tokenizer": cfg.tokenizer, "sources": self.source_stats,
                        "train_problems": len(train), "val_problems": len(val), "epochs": cfg.epochs}

    def train_dataloader(self):
        if self.trainer is not None and self.trainer.accumulate_grad_batches != 1:
            raise ValueError("GRPO makes its own optimizer steps (phase.grpo.mini_batches); keep "
                             "phase.accumulate_grad_batches at 1")
        return super().train_dataloader()


def _fill(packed: PackedChat) -> float:
    """Share of row positions that hold conversation tokens rather than padding."""
    return round(1.0 - packed.padding / packed.input_ids.size, 4) if packed.input_ids.size else 0.0


def _concat(parts: list[ExampleArrays]) -> ExampleArrays:
    if len(parts) == 1:
        return parts[0]
    offsets, base = [np.zeros(1, dtype=np.int64)], 0
    for part in parts:
        offsets.append(part.offsets[1:] + base)
        base += part.offsets[-1]
    return ExampleArrays(np.concatenate([p.input_ids for p in parts]), np.concatenate([p.labels for p in parts]),
                         np.concatenate(offsets))


def capped_sample(n: int, cap: int, seed: int) -> np.ndarray:
    """`cap` of the indices 0..n-1, drawn at random (seeded), in order: a validation set's cap."""
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


def _subset(arrays: ExampleArrays, keep: np.ndarray) -> ExampleArrays:
    return ExampleArrays.from_examples([TokenizedExample(*arrays[int(i)]) for i in keep])


def _write_chat_cache(folder: str, arrays: dict, stats: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    for split, sides in arrays.items():
        for side, a in sides.items():
            path = os.path.join(folder, f"{split}-{side}.npz")
            _atomic_write(path, lambda f, a=a: np.savez(f, input_ids=a.input_ids, labels=a.labels, offsets=a.offsets))
    _atomic_write(os.path.join(folder, "meta.json"), lambda f: f.write(json.dumps(stats, indent=1).encode()))


def _read_chat_cache(folder: str) -> tuple[dict, dict]:
    with open(os.path.join(folder, "meta.json")) as f:
        stats = json.load(f)
    arrays: dict = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".npz"):
            split, side = name[:-4].split("-", 1)
            with np.load(os.path.join(folder, name), allow_pickle=False) as z:
                arrays.setdefault(split, {})[side] = ExampleArrays(z["input_ids"], z["labels"], z["offsets"])
    return arrays, {**stats, "cached": True}


DATA_FORMAT_MODULES = {"sft": SFTDataModule, "preference": PreferenceDataModule, "prompts": PromptDataModule}


def chat_datamodule(config: ChatDataConfig) -> ChatDataModule:
    return DATA_FORMAT_MODULES[config.format](config)


__all__ = ["ChatDataConfig", "ChatSourceConfig", "PackedChat", "PreferenceDataModule", "PromptDataModule",
           "SFTDataModule", "chat_datamodule", "collate_pairs", "pack_conversations"]
