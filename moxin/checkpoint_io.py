"""Checkpoint files that are complete or absent: written to a temporary name, then renamed."""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """A kill during a save leaves at most a `*.tmp` file: the previous checkpoint stays usable
    and no half-written file carries a checkpoint's name (resume=auto looks for *.ckpt only)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            super().save_checkpoint(checkpoint, temporary, storage_options)
            with open(temporary, "rb") as f:
                os.fsync(f.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
