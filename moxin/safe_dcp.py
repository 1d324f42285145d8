"""Reading a distributed checkpoint (FSDP's folder) without unpickling arbitrary objects.

DCP reads tensors with torch.load(weights_only=True) but unpickles its `.metadata` file unrestricted;
a checkpoint folder given to task=evaluate may not be the user's own. Here that file is unpickled
through an allow-list of what DCP writes there.
"""

from __future__ import annotations

import importlib
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
           ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
           ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
           ("pathlib._local", "PosixPath"), ("pathlib._local", "WindowsPath")}


def allowed_global(module: str, name: str):
    """DCP's own metadata classes, tensor shapes, dtypes and layouts, and paths; anything else (a
    function to call, say) is refused before it is looked up."""
    if (module, name) in ALLOWED:
        return getattr(importlib.import_module(module), name)
    found = getattr(importlib.import_module(module), name, None) if module in ("torch", DCP_METADATA_MODULE) else None
    if module == DCP_METADATA_MODULE and isinstance(found, type) and found.__module__ == module:
        return found
    if module == "torch" and isinstance(found, torch.dtype):
        return found
    raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a distributed checkpoint's metadata")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        return allowed_global(module, name)


class SafeMetadataReader(FileSystemReader):
    """DCP's file reader, with its .metadata file unpickled through `allowed_global`."""

    def read_metadata(self, *args, **kwargs):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
