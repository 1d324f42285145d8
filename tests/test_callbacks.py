from types import SimpleNamespace

import pytest
import torch

from moxin.callbacks import ThroughputMonitor
from moxin.model import ModelConfig


def test_flops_per_token_is_six_n_plus_attention():
    cfg = ModelConfig(vocab_size=100, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, hidden_dim=16,
                      sliding_window=4)
    matmul_params = cfg.num_params(include_embeddings=False) + 100 * 8  # blocks + LM head, no embedding
    assert cfg.flops_per_token(seq_len=10) == 6 * matmul_params + 12 * 2 * 2 * 4 * 4  # span = window
    assert cfg.flops_per_token(seq_len=3) == 6 * matmul_params + 12 * 2 * 2 * 4 * 3  # span = sequence


def test_throughput_monitor_measures_between_batch_ends(monkeypatch):
    import moxin.callbacks

    clock = iter([10.0, 10.5, 11.0, 11.5, 20.0, 20.5])  # a fake clock: deterministic intervals
    monkeypatch.setattr(moxin.callbacks.time, "perf_counter", lambda: next(clock))
    logged = {}
    module = SimpleNamespace(log=lambda name, value, **kw: logged.__setitem__(name, value))
    ranks = {"rank": 0, "num_replicas": 2}  # two data-parallel replicas
    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(distributed_sampler_kwargs=ranks))
    monitor = ThroughputMonitor(flops_per_token=1e6, peak_tflops=1.0)
    batch = {"input_ids": torch.zeros(4, 100, dtype=torch.long)}
    monitor.on_train_start(trainer, module)  # 10.0
    for _ in range(3):  # batch ends at 10.5, 11.0, 11.5: 800 tokens (4 x 100 x 2 devices) per 0.5 s
        monitor.on_train_batch_end(trainer, module, None, batch, 0)
    assert logged["perf/tokens_per_s"] == pytest.approx(1600)
    assert logged["perf/mfu"] == pytest.approx(1600 * 1e6 / 2e12)
    monitor.on_validation_end(trainer, module)  # 20.0: the validation pause is not counted
    monitor.on_train_batch_end(trainer, module, None, batch, 0)  # 20.5
    assert logged["perf/tokens_per_s"] == pytest.approx(1600)
