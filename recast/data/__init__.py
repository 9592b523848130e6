"""Data layer: prepared tasks stored as Parquet + JSON manifest, and fast loaders over them.

Preparing: ``build_offline_suite`` (embedded digits suite, see ``recast.data.offline``) and
``prepare_paper_task`` (the paper's six datasets, see ``recast.data.paper``). Reading:
``read_manifest``, ``load_split``, ``BatchLoader`` (fast in-memory batches) and
``TaskDataset`` (map-style, for a standard DataLoader). Nothing here is ever pickled.
"""

from recast.data.augment import transform_batch
from recast.data.cifar import RestrictedUnpickler
from recast.data.download import REMOTES, ChecksumError, DownloadError, FetchPolicy, fetch
from recast.data.errors import DataError
from recast.data.loader import BatchLoader, TaskDataset
from recast.data.manifest import SPLITS, AugmentPolicy, TaskManifest, read_manifest, sha256_file
from recast.data.offline import OFFLINE_TASKS, SOURCE_TASK, build_offline_suite, describe
from recast.data.paper import PAPER_TASKS, locate, prepare_paper_task
from recast.data.storage import load_split

__all__ = [
    "OFFLINE_TASKS",
    "PAPER_TASKS",
    "SOURCE_TASK",
    "SPLITS",
    "AugmentPolicy",
    "REMOTES",
    "BatchLoader",
    "ChecksumError",
    "DataError",
    "DownloadError",
    "FetchPolicy",
    "RestrictedUnpickler",
    "TaskDataset",
    "TaskManifest",
    "build_offline_suite",
    "describe",
    "fetch",
    "load_split",
    "locate",
    "prepare_paper_task",
    "read_manifest",
    "sha256_file",
    "transform_batch",
]
