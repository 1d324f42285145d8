"""The pretraining LightningDataModule: read, tokenise, pack (or load from cache), mix, serve.

With `shards_dir`, the packed rows come instead from the token shards a curation run wrote
(moxin.curate.shards): nothing is read or tokenised, and the mix, sampler and resume state are the same.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from moxin.curate.shards import ShardedRows, list_streams, read_manifest
from moxin.data.mix import MixedSequenceDataset, validation_dataset
from moxin.data.pack import PackedSplit, pack_documents
from moxin.data.sources import SourceConfig, SourceStats, iter_documents, source_fingerprint
from moxin.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the packed layout changes, so old caches are not reused


@dataclass
class DataConfig:
    sources: list[SourceConfig]
    tokenizer: str = "mistral_v1"
    seq_len: int = 256
    micro_batch_size: int = 8
    val_fraction: float = 0.02
    val_max_sequences: int | None = 64
    num_samples: int | None = None  # training samples per epoch of the mix; None = all train rows
    seed: int = 1234
    num_workers: int = 0
    cache_dir: str | None = None
    # Curated token shards (streams "<source name>.train" / ".val"); when set, the sources are not read
    # and val_fraction and cache_dir do not apply: the curation run made the split.
    shards_dir: str | None = None
    token_budget: int | None = None  # curation: training tokens the mix keeps, shared by weight
    tiny_sources: list | None = None  # offline stand-ins that +scale=tiny trains on instead of `sources`
    warning: str | None = None  # said in the run's log (e.g. benchmark training splits in the mix)
    progress: bool = True

    def __post_init__(self) -> None:
        # Hydra may hand sources over as a list of dicts, or as a dict keyed by source name.
        if isinstance(self.sources, Mapping):
            self.sources = [{"name": k, **dict(v)} if isinstance(v, Mapping) else v for k, v in self.sources.items()]
        if not self.sources:
            raise ValueError("sources must list at least one source")
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**dict(s)) for s in self.sources]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources must have unique names, got {names}")
        for name in ("seq_len", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("val_max_sequences", "num_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be None or >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


class ResumeSampler(Sampler[int]):
    """This rank's share of indices 0..n-1 in order; the first pass after a resume is rotated to begin
    at `start`.

    Ranks take every world_size-th index (rank r: r, r + W, ...), so the micro-batches of one optimizer
    step on all ranks together are consecutive items of the order (chat data's step_tokens counts on
    that), and a resume continues each rank's share (start is a multiple of batch x world size). The
    pass keeps its full length because Lightning, resuming mid-epoch, counts the batches it already saw
    and ends the epoch after the remaining ones: those are exactly start..n-1, and the wrapped-around
    head is never reached. Lightning's own distributed sampler is turned off (it would shuffle).
    """

    def __init__(self, n: int, start: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.n, self.start, self.rank, self.world_size = n, start, rank, world_size

    def __iter__(self):
        start, self.start = self.start, 0  # only the first pass is rotated
        order = itertools.chain(range(start, self.n), range(start))
        return itertools.islice(order, self.rank, len(self) * self.world_size, self.world_size)

    def __len__(self) -> int:
        return self.n // self.world_size  # every rank the same count: none waits for a batch that never comes


def data_parallel_rank(trainer) -> tuple[int, int]:
    """(rank, number of ranks) among the data-parallel replicas of a run (1 replica without a trainer)."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer is not None else None
    if not kwargs:
        return 0, 1
    return int(kwargs["rank"]), int(kwargs["num_replicas"])


class ResumableDataModule(L.LightningDataModule):
    """Serves `train_dataset` in order through a ResumeSampler and saves how many samples were consumed,
    so a resumed run continues where its checkpoint left off. Subclasses build the datasets in setup()."""

    def __init__(self, micro_batch_size: int, num_workers: int = 0, collate_fn=None):
        super().__init__()
        self.micro_batch_size, self.num_workers, self.collate_fn = micro_batch_size, num_workers, collate_fn
        self.tokenizer = None
        self.train_dataset = None
        self.val_dataset = None
        self.summary: dict[str, Any] = {}
        self.resume_samples = 0  # training samples consumed before the checkpoint we resume from
        self._train_sampler: ResumeSampler | None = None
        # Micro-batches per training batch: pipeline parallelism takes an optimizer step's at once (its
        # schedule splits them again); validation batches stay single micro-batches.
        self.train_micro_batches = 1

    def world_size(self) -> int:
        return data_parallel_rank(self.trainer)[1]

    def train_dataloader(self) -> DataLoader:
        # The order is already seeded and drawn in the dataset; the sampler only makes a resumed run
        # continue where its checkpoint left off instead of replaying samples.
        dataset = self.train_dataset
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        rank, world = data_parallel_rank(self.trainer)
        self._train_sampler = ResumeSampler(len(dataset), self._resume_start(), rank, world)
        return self._loader(dataset, drop_last=True, sampler=self._train_sampler,
                            batch_size=self.micro_batch_size * self.train_micro_batches)

    def _resume_start(self) -> int:
        """Where the first pass begins: after the samples consumed, within the current pass."""
        per_step = self._samples_per_batch()
        per_epoch = len(self.train_dataset) // per_step * per_step
        return self.resume_samples % per_epoch if per_epoch else 0

    def state_dict(self) -> dict[str, int]:
        """Saved in Lightning checkpoints: how many training samples all ranks have consumed."""
        trainer = self.trainer
        if trainer is None:
            return {"consumed_samples": self.resume_samples}
        # A module that makes several optimizer steps per batch (GRPO) counts its batches itself.
        batches = getattr(trainer.lightning_module, "consumed_batches", None)
        if batches is None:
            batches = trainer.global_step * trainer.accumulate_grad_batches
        return {"consumed_samples": batches * self._samples_per_batch(), "replicas": self.world_size(),
                "samples_per_step": self.samples_per_step()}

    def _samples_per_batch(self) -> int:
        """The training samples of one loader batch on all replicas."""
        return self.micro_batch_size * self.train_micro_batches * self.world_size()

    def samples_per_step(self) -> int:
        """The training samples of one optimizer step on all replicas (GRPO: of one rollout batch)."""
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        return self._samples_per_batch() * accumulate

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_samples = int(state.get("consumed_samples", 0))
        # Ranks take every world-th item of the order, so the steps of a run with as many samples per step
        # hold the same items whatever the ranks, accumulation or pipeline (older checkpoints: the ranks).
        saved_step, step = state.get("samples_per_step"), self.samples_per_step()
        replicas, world = state.get("replicas"), self.world_size()  # the checkpoint's run's ranks, ours
        message = None
        if saved_step is not None and saved_step != step:
            message = (f"resuming with {step} samples per optimizer step a run checkpointed with {saved_step}: the "
                       f"data continues after the {self.resume_samples} samples consumed, but its steps group them "
                       "otherwise, so the rest of the run is not the one an uninterrupted run would see")
        elif saved_step is None and replicas not in (None, world):
            message = (f"resuming on {world} data-parallel ranks a run checkpointed on {replicas}: the "
                       f"data continues after the {self.resume_samples} samples consumed, but the epoch's remaining "
                       "batches are counted per rank, so the rest of the run is not the one an uninterrupted run "
                       "would see")
        if message:
            logging.getLogger(__name__).warning(message)
            print(f"WARNING: {message}")
        if self._train_sampler is not None:
            # Strategies that restore after setting up (FSDP, Colossal-AI) may have built the loader
            # already, to size the LR schedule: its sampler has not started yet, so it can still move.
            self._train_sampler.start = self._resume_start()

    def val_dataloader(self) -> DataLoader:
        rank, world = data_parallel_rank(self.trainer)
        if world == 1 or self.val_dataset is None:
            return self._loader(self.val_dataset, drop_last=False)
        # Each rank a share; the last share is padded with repeats so every rank runs the same batches.
        sampler = DistributedSampler(self.val_dataset, num_replicas=world, rank=rank, shuffle=False)
        return self._loader(self.val_dataset, drop_last=False, sampler=sampler)

    def _loader(self, dataset, drop_last: bool, sampler: Sampler | None = None,
                batch_size: int | None = None) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=batch_size or self.micro_batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )


class PretrainDataModule(ResumableDataModule):
    """Packed, weighted-mixed pretraining data. After `setup()`: `tokenizer`, `train_dataset`,
    `val_dataset` and `summary` (a JSON-able dict: per-source reading/packing counts and the mix)."""

    def __init__(self, config: DataConfig):
        super().__init__(config.micro_batch_size, config.num_workers)
        self.config = config

    def prepare_data(self) -> None:
        """Lightning runs this on one process per node before `setup` runs on every rank: with a
        cache, the sources are read and tokenised once here and the ranks load the result."""
        if self.config.cache_dir is None or self.config.shards_dir is not None or self.train_dataset is not None:
            return
        self.tokenizer = load_tokenizer(self.config.tokenizer)
        for source in self.config.sources:
            self._load_or_pack(source)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return  # Lightning calls setup once per stage; packing is done once
        cfg = self.config
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        if cfg.shards_dir is not None:
            train, val, sources = self._open_shards()
        else:
            train, val, sources = {}, {}, {}
            for source in cfg.sources:
                packed, info = self._load_or_pack(source)
                train[source.name], val[source.name] = packed["train"].rows, packed["val"].rows
                sources[source.name] = info
        self.train_dataset = MixedSequenceDataset(
            train, {s.name: s.weight for s in cfg.sources}, cfg.num_samples, cfg.seed
        )
        self.val_dataset = validation_dataset(val, cfg.val_max_sequences)
        self.summary = {
            "tokenizer": cfg.tokenizer,
            "vocab_size": len(self.tokenizer),
            "seq_len": cfg.seq_len,
            "sources": sources,
            "mix": self.train_dataset.mix_summary(),
            "train_samples": len(self.train_dataset),
            "train_tokens": len(self.train_dataset) * cfg.seq_len,
            "val_sequences": len(self.val_dataset),
        }

    # --- curated shards ---

    def _open_shards(self) -> tuple[dict[str, ShardedRows], dict[str, ShardedRows], dict[str, Any]]:
        """Per source: train rows from stream "<name>.train", validation rows from "<name>.val" when
        the curation run wrote one; and the summary's per-source "shards" entry."""
        cfg = self.config
        manifest = read_manifest(cfg.shards_dir)
        made_with = manifest.get("tokenizer")
        if made_with != cfg.tokenizer:
            raise ValueError(
                f"the shards in {cfg.shards_dir} were tokenised with {made_with!r} (manifest.json), "
                f"but data.tokenizer is {cfg.tokenizer!r}"
            )
        streams = list_streams(cfg.shards_dir)
        train, val, sources = {}, {}, {}
        for source in cfg.sources:
            if f"{source.name}.train" not in streams:
                raise ValueError(
                    f"source {source.name!r}: no stream {source.name + '.train'!r} in {cfg.shards_dir}; "
                    f"streams found: {streams}"
                )
            splits = {"train": ShardedRows(cfg.shards_dir, f"{source.name}.train", cfg.seq_len)}
            if f"{source.name}.val" in streams:
                try:
                    splits["val"] = ShardedRows(cfg.shards_dir, f"{source.name}.val", cfg.seq_len)
                    val[source.name] = splits["val"]
                except ValueError as short:  # e.g. a few short QA items: no whole row to validate on
                    log.warning("source %s: no validation rows (%s)", source.name, short)
            train[source.name] = splits["train"]
            sources[source.name] = {
                "shards": {
                    split: {
                        "shards": len(rows.shards),
                        "rows": len(rows),
                        "tokens": rows.tokens,
                        "dropped_tokens": rows.dropped_tokens,
                    }
                    for split, rows in splits.items()
                }
            }
        return train, val, sources

    # --- reading, packing and the cache ---

    def _load_or_pack(self, source: SourceConfig) -> tuple[dict[str, PackedSplit], dict[str, Any]]:
        cfg = self.config
        folder = None
        if cfg.cache_dir is not None:
            folder = os.path.join(cfg.cache_dir, f"{source.name}-{self._cache_key(source)}")
            if os.path.exists(os.path.join(folder, "meta.json")):  # meta.json is written last
                return _read_cache(folder)
        stats = SourceStats()
        train, val = pack_documents(
            iter_documents(source, stats),
            self.tokenizer,
            cfg.seq_len,
            cfg.val_fraction,
            progress=cfg.progress,
            description=f"packing {source.name}",
            total=source.max_documents,
        )
        packed = {"train": train, "val": val}
        info = {
            "kind": source.kind,
            "documents": stats.documents,
            "bytes": stats.bytes,
            "skipped": dict(stats.skipped),
        }
        for split, p in packed.items():
            info.update({f"{split}_documents": p.documents, f"{split}_tokens": p.tokens})
            info.update({f"{split}_dropped_tokens": p.dropped_tokens, f"{split}_rows": len(p.rows)})
        if folder is not None:
            _write_cache(folder, packed, info)
        return packed, {**info, "cached": False}

    def _cache_key(self, source: SourceConfig) -> str:
        """Everything that decides the packed arrays; the weight only matters to the mix."""
        key = {
            "format": CACHE_FORMAT,
            "source": {k: v for k, v in asdict(source).items() if k != "weight"},
            "fingerprint": source_fingerprint(source),
            "tokenizer": self.config.tokenizer,
            "seq_len": self.config.seq_len,
            "val_fraction": self.config.val_fraction,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_write(path: str, write) -> None:
    # Write to a temporary name, then rename: a crash never leaves a half-written file under `path`.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _write_cache(folder: str, packed: dict[str, PackedSplit], info: dict[str, Any]) -> None:
    os.makedirs(folder, exist_ok=True)
    for split, p in packed.items():
        _atomic_write(os.path.join(folder, f"{split}.npy"), lambda f, rows=p.rows: np.save(f, rows))
    _atomic_write(os.path.join(folder, "meta.json"), lambda f: f.write(json.dumps(info, indent=1).encode()))


def _read_cache(folder: str) -> tuple[dict[str, PackedSplit], dict[str, Any]]:
    with open(os.path.join(folder, "meta.json")) as f:
        info = json.load(f)
    packed = {
        split: PackedSplit(
            np.load(os.path.join(folder, f"{split}.npy"), mmap_mode="r"),  # pages shared with workers
            info[f"{split}_documents"],
            info[f"{split}_tokens"],
            info[f"{split}_dropped_tokens"],
        )
        for split in ("train", "val")
    }
    return packed, {**info, "cached": True}
