"""The files of /v1/files: JSONL inputs of batches, kept on disk until deleted.

Each file is ``ID.jsonl`` with its metadata beside it in ``ID.json``; a file belongs to the
tenant that uploaded it (another tenant gets 404, as for a file that does not exist). Files
live next to the job store (``jobs.files/`` beside ``jobs.db``), or in a temporary directory
when the job store keeps nothing (``:memory:``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "object": "file", "bytes": self.bytes,
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed"}


class FileStore:
    """Not thread-safe per file id; ids are fresh uuids, so writers never share one."""

    def __init__(self, root: Path | None) -> None:
        self._temp = None if root is not None else tempfile.mkdtemp(prefix="backfill-files-")
        self.root = root if root is not None else Path(self._temp or "")
        self.root.mkdir(parents=True, exist_ok=True)

    def create(
        self, tenant: str, filename: str, purpose: str, chunks: Iterator[bytes]
    ) -> FileRecord:
        file_id = f"file-{uuid.uuid4().hex}"
        size = 0
        with open(self._data(file_id), "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
        record = FileRecord(file_id, tenant, filename, purpose, size, int(time.time()))
        self._meta(file_id).write_text(json.dumps(asdict(record)), encoding="utf-8")
        return record

    def get(self, tenant: str, file_id: str) -> FileRecord | None:
        if not _valid_id(file_id):
            return None
        try:
            record = FileRecord(**json.loads(self._meta(file_id).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None
        return record if record.tenant == tenant else None

    def list(self, tenant: str) -> list[FileRecord]:
        records = [self.get(tenant, p.stem) for p in self.root.glob("file-*.json")]
        return sorted((r for r in records if r is not None), key=lambda r: -r.created_at)

    def read(self, record: FileRecord) -> Iterator[bytes]:
        with open(self._data(record.id), "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk

    def delete(self, record: FileRecord) -> None:
        self._meta(record.id).unlink(missing_ok=True)
        self._data(record.id).unlink(missing_ok=True)

    def close(self) -> None:
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)

    def _data(self, file_id: str) -> Path:
        return self.root / f"{file_id}.jsonl"

    def _meta(self, file_id: str) -> Path:
        return self.root / f"{file_id}.json"


def _valid_id(file_id: str) -> bool:
    """Ids are ours: ``file-`` and 32 hex digits (no path can be named)."""
    rest = file_id.removeprefix("file-")
    return len(rest) == 32 and all(c in "0123456789abcdef" for c in rest)
