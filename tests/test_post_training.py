"""SFT and DPO: packed attention isolation, loss normalisation, DPO losses, reference and its cache."""

import contextlib
import math
import types

import numpy as np
import pytest
import torch

from moxin.data.chat_data import ChatDataConfig, ChatSourceConfig, PreferenceDataModule
from moxin.losses import (
    IGNORE_INDEX,
    dpo_loss,
    linear_cross_entropy,
    preference_metrics,
    sequence_logps,
    sequence_logps_from_hidden,
)
from moxin.model import ModelConfig, Transformer
from moxin.modules import DPOConfig, DPOModule, OptimConfig, SFTModule

TINY = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                   sliding_window=6, max_seq_len=64)


@pytest.mark.parametrize("window", [6, 64])  # rows longer than the window (attention per block) and shorter
def test_packed_sequences_compute_as_if_alone(window):
    import dataclasses

    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(TINY, sliding_window=window))
    a, b, c = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 13)), torch.randint(0, 97, (1, 4))
    row = torch.cat([a, b, c], dim=1)
    segments = torch.tensor([[0] * 9 + [1] * 13 + [2] * 4])
    packed = model(row, segments=segments)
    # Each sequence (b is longer than a window of 6) gives the logits it gives alone.
    torch.testing.assert_close(packed[:, :9], model(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 9:22], model(b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 22:], model(c), atol=1e-5, rtol=1e-5)
    # And a conversation's summed loss is the same alone or packed.
    labels = torch.cat([a[:, 1:], torch.full((1, 1), IGNORE_INDEX), b[:, 1:], torch.full((1, 5), IGNORE_INDEX)], 1)
    alone = linear_cross_entropy(model.hidden_states(b[:, :-1]), model.output.weight, b[:, 1:], reduction="sum")
    mask_b = torch.zeros_like(labels, dtype=torch.bool)
    mask_b[:, 9:21] = True
    hidden = model.hidden_states(row, segments=segments)
    in_row = linear_cross_entropy(hidden, model.output.weight, labels.masked_fill(~mask_b, IGNORE_INDEX),
                                  reduction="sum")
    torch.testing.assert_close(in_row, alone, atol=1e-4, rtol=1e-5)


def test_sequence_logps_sum_mean_and_from_hidden():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[3, IGNORE_INDEX, 4, 5, IGNORE_INDEX], [IGNORE_INDEX] * 4 + [7]])
    logp = torch.log_softmax(logits, -1)
    manual = torch.stack([logp[0, 0, 3] + logp[0, 2, 4] + logp[0, 3, 5], logp[1, 4, 7]])
    torch.testing.assert_close(sequence_logps(logits, labels), manual)
    torch.testing.assert_close(sequence_logps(logits, labels, average=True), manual / torch.tensor([3.0, 1.0]))
    hidden, weight = torch.randn(2, 5, 6), torch.randn(11, 6)
    torch.testing.assert_close(sequence_logps_from_hidden(hidden, weight, labels),
                               sequence_logps(hidden @ weight.T, labels), atol=1e-5, rtol=1e-5)


def test_dpo_losses_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-4.0, -9.0, -5.0, -6.0))
    beta, margin = 0.5, (-4.0 + 5.0) - (-9.0 + 6.0)  # 4
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, loss="sigmoid", beta=beta)
    assert losses.item() == pytest.approx(-math.log(sig(beta * margin)))
    assert chosen.item() == pytest.approx(beta * 1.0) and rejected.item() == pytest.approx(beta * -3.0)
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, loss="sigmoid", beta=beta, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(-0.9 * math.log(sig(2.0)) - 0.1 * math.log(sig(-2.0)))
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, loss="ipo", beta=beta)
    assert ipo.item() == pytest.approx((margin - 1 / (2 * beta)) ** 2)
    hinge, _, _ = dpo_loss(pc, pr, rc, rr, loss="hinge", beta=0.1)
    assert hinge.item() == pytest.approx(max(0.0, 1 - 0.1 * margin))
    # dpo_norm divides each side by its reply's token count first: 2 chosen tokens, 3 rejected.
    norm, chosen, _ = dpo_loss(pc, pr, rc, rr, loss="dpo_norm", beta=5.0, chosen_tokens=torch.tensor([2]),
                               rejected_tokens=torch.tensor([3]))
    norm_margin = (-4.0 + 5.0) / 2 - (-9.0 + 6.0) / 3
    assert norm.item() == pytest.approx(-math.log(sig(5.0 * norm_margin)))
    assert chosen.item() == pytest.approx(5.0 * 0.5)
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(pc, pr, rc, rr, loss="dpo_norm")
    metrics = preference_metrics(torch.tensor([1.0, -1.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert metrics["reward_accuracy"].item() == pytest.approx(1 / 3)
    assert metrics["reward_margin"].item() == pytest.approx(-1 / 3)


def _pairs_datamodule(n=24, seq_len=64, micro=4, **kwargs):
    config = ChatDataConfig(sources=[ChatSourceConfig(name="p", kind="synthetic", path="preferences",
                                                      num_examples=n, seed=5)],
                            format="preference", seq_len=seq_len, micro_batch_size=micro, val_fraction=0.25,
                            progress=False, **kwargs)
    dm = PreferenceDataModule(config)
    dm.setup()
    return dm


def _dpo_module(loss="sigmoid", reference="copy", seed=0, cache_dir=None):
    torch.manual_seed(seed)
    module = DPOModule(ModelConfig(vocab_size=32000, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                   hidden_dim=64, sliding_window=16, max_seq_len=128),
                       OptimConfig(lr=1e-3, warmup_steps=0), dpo=DPOConfig(loss=loss, beta=0.1,
                                                                           reference=reference,
                                                                           cache_dir=cache_dir))
    module.set_reference(module.model.state_dict())
    return module


@pytest.mark.parametrize("loss", ["sigmoid", "dpo_norm"])
def test_dpo_starts_at_ln2_and_trains_only_the_policy(loss):
    dm = _pairs_datamodule()
    module = _dpo_module(loss)
    batch = dm.collate_fn([dm.train_dataset[i] for i in range(4)])
    value, metrics = module.preference_step(batch)
    assert value.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert metrics["reward_margin"].item() == pytest.approx(0.0, abs=1e-6)
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in module.reference.parameters())


def _fit(module, dm, tmp_path, steps, accumulate=1, callbacks=()):
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", max_steps=steps, max_epochs=1, accumulate_grad_batches=accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=list(callbacks))
    trainer.fit(module, datamodule=dm)
    return trainer


def test_cached_reference_matches_the_copy_and_is_reused(tmp_path, monkeypatch):
    copy = _dpo_module(reference="copy")
    cached = _dpo_module(reference="cached", cache_dir=str(tmp_path / "cache"))
    dm_copy, dm_cached = _pairs_datamodule(), _pairs_datamodule()
    _fit(copy, dm_copy, tmp_path / "a", steps=3)
    _fit(cached, dm_cached, tmp_path / "b", steps=3)
    files = list((tmp_path / "cache").glob("reference-logps-*.safetensors"))
    assert len(files) == 1
    # The cached log-probs are the starting model's, pair by pair, for training and validation pairs.
    start = _dpo_module().model
    for split in ("train", "val"):
        dataset = getattr(dm_cached, f"{split}_dataset")
        batch = dm_cached.collate_fn([{"index": i, "chosen": dataset.chosen[i], "rejected": dataset.rejected[i]}
                                      for i in range(dataset.pairs())])
        expected = DPOModule.sequence_logps(start, batch).detach().double().view(2, -1).T
        torch.testing.assert_close(cached.cached_reference[split], expected, atol=1e-4, rtol=1e-5)
    # Both runs trained to the same weights.
    for a, b in zip(copy.model.parameters(), cached.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # A second run with the same data and starting weights reads the file instead of recomputing.
    monkeypatch.setattr(DPOModule, "_compute_reference", lambda *a: pytest.fail("recomputed the cache"))
    again = _dpo_module(reference="cached", cache_dir=str(tmp_path / "cache"))
    _fit(again, _pairs_datamodule(), tmp_path / "c", steps=1)


def test_rank_0_decides_whether_the_cached_reference_exists_and_reads_it_for_every_rank(tmp_path, monkeypatch):
    """On rank 1, whose (node-local) cache folder lacks the file rank 0 found: rank 1 takes rank 0's verdict
    and tensors, instead of computing the log-probs alone (a sharded computation is collective)."""
    dm = _pairs_datamodule()
    module = _dpo_module(reference="cached", cache_dir=str(tmp_path / "empty"))
    rank_0 = {"train": torch.randn(dm.train_dataset.pairs(), 2, dtype=torch.float64),
              "val": torch.randn(dm.val_dataset.pairs(), 2, dtype=torch.float64)}
    sent = []

    def broadcast(value):  # rank 1's side: it sends its own value and receives rank 0's
        sent.append(value)
        return True if len(sent) == 1 else rank_0

    module._trainer = types.SimpleNamespace(datamodule=dm, precision="32-true", default_root_dir=str(tmp_path),
                                            world_size=2, is_global_zero=False,
                                            strategy=types.SimpleNamespace(broadcast=broadcast))
    monkeypatch.setattr(DPOModule, "_compute_reference", lambda *a: pytest.fail("computed alone"))
    module._load_or_compute_cached_reference()
    assert sent == [False, None]  # it found no file, and read none
    for split, values in rank_0.items():
        assert torch.equal(module.cached_reference[split], values)


def test_cached_reference_before_training_with_loader_workers(tmp_path):
    """The validation run before training (validate_before_training) works with worker processes."""
    import lightning as L

    module = _dpo_module(reference="cached", cache_dir=str(tmp_path / "cache"))
    dm = _pairs_datamodule(num_workers=1)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_resumes_against_the_same_reference(tmp_path):
    """The reference stays out of checkpoints; a resumed run rebuilds it from the starting weights,
    and refuses other starting weights than the ones it was trained against."""
    module = _dpo_module()
    trainer = _fit(module, _pairs_datamodule(), tmp_path / "a", steps=2)
    path = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert not any(k.startswith("reference.") for k in saved["state_dict"])
    resumed = _dpo_module()  # same seed: the same starting weights
    import lightning as L

    L.Trainer(accelerator="cpu", max_steps=3, max_epochs=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path / "b"),
              num_sanity_val_steps=0, limit_val_batches=0).fit(resumed, datamodule=_pairs_datamodule(),
                                                               ckpt_path=str(path), weights_only=True)
    start = _dpo_module().model
    for ref, original in zip(resumed.reference.parameters(), start.parameters(), strict=True):
        assert torch.equal(ref, original)  # the reference is still the starting model, not the checkpoint
    other = _dpo_module(seed=1)
    with pytest.raises(ValueError, match="other reference weights"):
        other.on_load_checkpoint(saved)


class _GradCapture:
    """Records the accumulated gradients just before the first optimizer step."""

    def __init__(self):
        from lightning.pytorch.callbacks import Callback

        outer = self

        class _Cb(Callback):
            def on_before_optimizer_step(self, trainer, module, optimizer):
                if outer.grads is None:
                    outer.grads = [p.grad.detach().clone() for p in module.model.parameters()]

        self.grads = None
        self.callback = _Cb()


def _sft_datamodule(micro):
    from moxin.data.chat_data import SFTDataModule

    config = ChatDataConfig(sources=[ChatSourceConfig(name="s", kind="synthetic", path="instructions",
                                                      num_examples=60, seed=2)],
                            seq_len=48, micro_batch_size=micro, val_fraction=0.0, progress=False, pack=False)
    dm = SFTDataModule(config)
    dm.setup()
    return dm


def test_sft_loss_is_normalised_by_the_global_batch_under_accumulation(tmp_path):
    """Four rows with different numbers of trained tokens: the gradient of one step is that of
    (sum of all token losses) / (all trained tokens), whether the rows come as 1 micro-batch of 4,
    4 accumulated micro-batches of 1, or two simulated ranks of 2 rows each."""
    cfg = ModelConfig(vocab_size=32000, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                      sliding_window=16, max_seq_len=64)
    grads = {}
    for micro, accumulate in ((4, 1), (1, 4)):
        torch.manual_seed(0)
        module = SFTModule(cfg, OptimConfig(lr=1e-3, warmup_steps=0))
        capture = _GradCapture()
        _fit(module, _sft_datamodule(micro), tmp_path / f"m{micro}", steps=1, accumulate=accumulate,
             callbacks=[capture.callback])
        grads[micro] = capture.grads
    # The reference: the four rows' summed loss over their trained tokens, in one plain backward.
    torch.manual_seed(0)
    reference = SFTModule(cfg, OptimConfig(lr=1e-3, warmup_steps=0))
    dm = _sft_datamodule(4)
    dm.train_dataset.fit_to_steps(4)
    rows = [dm.train_dataset[i] for i in range(4)]
    trained = [int((r["labels"] != IGNORE_INDEX).sum()) for r in rows]
    assert len(set(trained)) > 1  # the rows differ, so a per-micro-batch mean would be wrong
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels", "segments")}
    total, count = reference.loss_sum(batch)
    (total / count).backward()
    expected = [p.grad for p in reference.model.parameters()]
    for micro in (4, 1):
        for got, want in zip(grads[micro], expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # Two ranks of two rows, each step's loss scaled as on a real run; DDP averages the ranks' gradients.
    torch.manual_seed(0)
    module = SFTModule(cfg, OptimConfig(lr=1e-3, warmup_steps=0))
    module.log = module.log_lr = lambda *a, **k: None
    module.nonfinite = lambda loss: False
    module._trainer = types.SimpleNamespace(world_size=2, accumulate_grad_batches=1, strategy=types.SimpleNamespace(
        distributed_sampler_kwargs={"rank": 0, "num_replicas": 2}))
    averaged = [torch.zeros_like(p) for p in module.model.parameters()]
    for rank_rows in (rows[:2], rows[2:]):
        rank_batch = {k: torch.stack([r[k] for r in rank_rows]) for k in ("input_ids", "labels", "segments",
                                                                           "step_tokens")}
        module.model.zero_grad()
        module.training_step(rank_batch, 0).backward()
        for acc, p in zip(averaged, module.model.parameters(), strict=True):
            acc += p.grad / 2
    for got, want in zip(averaged, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_packed_attention_with_repeated_key_value_heads_is_the_same(monkeypatch):
    """On CUDA, packed rows repeat key/value heads so a memory-efficient kernel takes the mask; the
    result equals grouped-query attention (checked here by forcing that path on the CPU)."""
    import moxin.model

    torch.manual_seed(0)
    model = Transformer(TINY)
    tokens = torch.randint(0, 97, (2, 20))
    segments = torch.tensor([[0] * 7 + [1] * 13, [0] * 20])
    grouped = model(tokens, segments=segments)
    monkeypatch.setattr(moxin.model, "repeat_kv_for_masks", lambda q: True)
    torch.testing.assert_close(model(tokens, segments=segments), grouped, atol=1e-5, rtol=1e-5)


def test_cached_reference_shares_gathered_across_ranks_give_every_pair():
    """Two data-parallel ranks each compute every other pair; the gathered result is the one-rank result.
    The 4 processes are 2 pipeline stages (the outermost split) of the 2 ranks: process p holds data-parallel
    rank p % 2, and each rank's share is taken once."""
    from moxin.data.chat_data import PreferenceDataset, _subset

    dm = _pairs_datamodule(n=30)
    odd = np.arange(17)  # an uneven split over 2 ranks: 9 pairs in 3 batches of up to 4, and 8 pairs in 2
    dm.train_dataset = PreferenceDataset(_subset(dm.train_dataset.chosen, odd), _subset(dm.train_dataset.rejected, odd))
    module = _dpo_module(reference="cached")
    forwards, sequence_logps = {}, module.sequence_logps  # each rank's: a sharded model's forward is collective

    def counted(model, batch):
        rank = module._trainer.global_rank
        forwards[rank] = forwards.get(rank, 0) + 1
        return sequence_logps(model, batch)

    module.sequence_logps = counted
    precision = types.SimpleNamespace(forward_context=contextlib.nullcontext)
    processes, shares = (0, 1, 0, 1), {}

    def trainer(rank, ranks):
        def all_gather(value):  # every process's value: its data-parallel rank, or its rank's share
            if value.ndim == 0:
                return torch.tensor(processes)
            shares[rank] = value.clone()
            return torch.stack([shares.get(r, value * 0) for r in processes])

        strategy = types.SimpleNamespace(all_gather=all_gather, distributed_sampler_kwargs={
            "rank": rank, "num_replicas": ranks})
        return types.SimpleNamespace(world_size=ranks, global_rank=rank, precision_plugin=precision, strategy=strategy)

    module._trainer = trainer(0, 1)
    alone = module._compute_reference(dm.train_dataset, dm)
    module._trainer = trainer(1, 2)
    module._compute_reference(dm.train_dataset, dm)
    module._trainer = trainer(0, 2)
    forwards.clear()
    gathered = module._compute_reference(dm.train_dataset, dm)
    assert forwards == {0: 3}
    module._trainer = trainer(1, 2)
    module._compute_reference(dm.train_dataset, dm)
    assert forwards == {0: 3, 1: 3}
    torch.testing.assert_close(gathered, alone)
