"""Pretraining data: sources -> documents -> packed token rows -> weighted mix -> DataLoaders."""

from moxin.data.datamodule import DataConfig, PretrainDataModule
from moxin.data.sources import SourceConfig, SourceStats, iter_documents

__all__ = ["DataConfig", "PretrainDataModule", "SourceConfig", "SourceStats", "iter_documents"]
