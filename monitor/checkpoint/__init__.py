"""Checkpoints: a VM's memory, disk, vCPU and component state, as zstd-compressed checksummed records.

The package, by concern (docs/checkpoints.md describes the format):

- `format`: framing, records, checksums, parsing and writing files (no KVM);
- `compat`: whether a checkpoint (or an event log: monitor/record.py) fits this vmft, image and host;
- `memops`: host memory helpers (zero tests, pre-faulting, range arithmetic);
- `take`: `Checkpointer` (full and incremental checkpoints with pre-copy, as records or a file);
- `restore`: the one restore path for files, chains and streams (reached through monitor/builder.py);
- `store`: `CheckpointStore`, a directory of periodic checkpoints and its retention.
"""

from monitor.checkpoint.format import (
    FORMAT_VERSION,
    MAGIC,
    SUFFIX,
    ParsedCheckpoint,
    RecordType,
    Region,
    file_records,
    open_checkpoint,
    read_header,
    write_records,
)
from monitor.checkpoint.restore import Loading, RecordStream, RestoreStats, find_chain
from monitor.checkpoint.store import CheckpointStore, SavedCheckpoint
from monitor.checkpoint.take import Checkpointer, CheckpointStats
from monitor.errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "SUFFIX",
    "CheckpointError",
    "CheckpointStats",
    "Loading",
    "CheckpointStore",
    "Checkpointer",
    "ParsedCheckpoint",
    "RecordStream",
    "RecordType",
    "Region",
    "RestoreStats",
    "SavedCheckpoint",
    "file_records",
    "find_chain",
    "open_checkpoint",
    "read_header",
    "write_records",
]
