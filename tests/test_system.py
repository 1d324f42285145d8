import subprocess
import sys

import pytest

# One training step of a small model with the full 32,000-token vocabulary: its logits and their
# gradients are blocks of ~130 MB, far above glibc's default 32 MB mmap threshold.
WORKLOAD = """
import resource, sys, torch
from moxin.losses import causal_lm_loss
from moxin.model import ModelConfig, Transformer
from moxin.system import keep_freed_memory_for_reuse
if sys.argv[1] == "tuned":
    assert keep_freed_memory_for_reuse()
torch.manual_seed(0)
model = Transformer(ModelConfig(vocab_size=32000, dim=64, n_layers=1, n_heads=2, n_kv_heads=1,
                                head_dim=32, hidden_dim=128, max_seq_len=256))
tokens = torch.randint(0, 32000, (8, 129))
def step():
    causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_logits_memory_is_reused_instead_of_faulted_in_again():
    default, tuned = page_faults("default"), page_faults("tuned")
    assert tuned < default / 2, (default, tuned)


def test_available_memory_is_read_from_the_kernel():
    import sys

    from moxin.system import available_memory_bytes

    available = available_memory_bytes()
    if sys.platform.startswith("linux"):
        assert isinstance(available, int) and 0 < available
    else:
        assert available is None


def test_a_containers_memory_limit_bounds_the_available_memory(tmp_path):
    from moxin.system import _cgroup_headroom

    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(f"{8 * 2**30}\n")
    usage.write_text(f"{3 * 2**30}\n")
    assert _cgroup_headroom([(str(limit), str(usage))]) == 5 * 2**30
    limit.write_text("max\n")  # cgroup v2 without a limit
    assert _cgroup_headroom([(str(limit), str(usage))]) is None
    missing = str(tmp_path / "none")
    assert _cgroup_headroom([(missing, missing), (str(limit), str(usage))]) is None
