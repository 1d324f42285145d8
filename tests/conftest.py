import os
import sys
import tempfile

import pytest
from hydra import compose, initialize_config_dir

from moxin.colossalai_strategy import colossalai_available

needs_colossalai = pytest.mark.skipif(not colossalai_available(),
                                      reason="colossalai is not installed (make install-colossalai)")
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@pytest.fixture(autouse=True)
def offline_and_contained(tmp_path, monkeypatch):
    """No test reaches a hub, temporary and cached files land in the test's own tmp_path, and the
    process-wide kernel switch (which a training run sets) does not leak into the next test."""
    import datasets

    from moxin import kernels

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    # datasets' cache of prepared local datasets would otherwise be the user's own, shared one.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(kernels, "_enabled", False)
    media = sys.modules.get("wandb.sdk.data_types._private")
    if media is not None:  # W&B's process-wide media folder was made in an earlier test's (deleted) tmp_path
        (tmp_path / "wandb-media").mkdir()
        monkeypatch.setattr(media.MEDIA_TMP, "name", str(tmp_path / "wandb-media"))


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the Hydra config with overrides; every path points into this test's tmp_path."""

    def _make(*overrides: str, run_name: str = "run"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=[
                f"paths.output_root={tmp_path}",
                f"paths.run_dir={tmp_path / run_name}",
                "logger=csv",
                "progress_bar=false",
                *overrides,
            ])

    return _make


@pytest.fixture(scope="session")
def eval_data_dir(tmp_path_factory):
    return local_eval_fixtures(tmp_path_factory.mktemp("eval_data"))


def local_eval_fixtures(folder):
    """Local copies of the evaluation fixtures (tests/eval_fixtures.py), written the way
    task=eval_data writes real ones, for lm-eval's real task definitions to read offline."""
    from moxin.eval.commands import make_local_copies
    from moxin.eval.suites import EvalSuite
    from tests.eval_fixtures import fake_load_dataset

    suite = EvalSuite(name="fixtures", tasks=[{"name": n} for n in (
        "arc_easy", "wikitext", "gsm8k", "humaneval", "popqa", "mmlu", "minerva_math_algebra", "math500_reasoning",
        "amc_reasoning", "minerva_reasoning", "olympiadbench_reasoning")])
    make_local_copies(suite, str(folder), work_dir=folder / "work", load_dataset=fake_load_dataset)
    return folder
