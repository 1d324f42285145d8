"""Training data. Pretraining: sources -> documents -> packed token rows -> weighted mix -> DataLoaders.
Post-training (moxin.data.chat_data): chat sources -> conversations with loss masks -> SFT rows or DPO pairs."""

from moxin.data.chat_data import ChatDataConfig, ChatSourceConfig
from moxin.data.datamodule import DataConfig, PretrainDataModule
from moxin.data.sources import SourceConfig, SourceStats, iter_documents

__all__ = ["ChatDataConfig", "ChatSourceConfig", "DataConfig", "PretrainDataModule", "SourceConfig", "SourceStats",
           "iter_documents"]
