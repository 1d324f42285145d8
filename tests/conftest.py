import os
import tempfile

import pytest
from hydra import compose, initialize_config_dir

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@pytest.fixture(autouse=True)
def offline_and_contained(tmp_path, monkeypatch):
    """No test reaches a hub, temporary files land in the test's own tmp_path, and the
    process-wide kernel switch (which a training run sets) does not leak into the next test."""
    from moxin import kernels

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(kernels, "_enabled", False)


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
