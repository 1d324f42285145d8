import os

import pytest
from hydra import compose, initialize_config_dir

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


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
