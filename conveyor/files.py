"""Files in PostgreSQL, written and read in chunks: uploads for jobs, artifacts from jobs."""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Iterable, Iterator
from typing import IO

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from conveyor.errors import NotFound, StorageQuotaExceeded
from conveyor.models import Artifact, ArtifactChunk, Upload, UploadChunk
from conveyor.tenancy import owned

CHUNK_SIZE = 1024 * 1024
# A stored upload name is at most this many bytes of UTF-8 (most file systems' limit).
MAX_FILENAME_BYTES = 255
FALLBACK_FILENAME = "upload.csv"
# Unicode categories dropped from upload names: controls (NUL included), format characters
# (bidi overrides such as U+202E, which make `x\u202evsc.exe` read as `xexe.csv`,
# zero-width ones), lone surrogates (PostgreSQL refuses them), line and paragraph separators.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# Leading dots (`..`, hidden files) and the spaces around them.
_LEADING_DOTS = re.compile(r"^[\s.]+")


def safe_filename(name: str) -> str:
    """Return a client's file name fit to store and show: one plain component, no controls.

    The client's name is a label, never a path: only its last component (after a slash or
    backslash) is kept, without invisible or control characters or leading dots,
    NFC-normalised, at most 255 bytes of UTF-8 (cut before a short extension, which
    survives); `upload.csv` when nothing is left.
    """
    visible = "".join(c for c in name if unicodedata.category(c) not in _DROPPED_CATEGORIES)
    last = unicodedata.normalize("NFC", visible).replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _LEADING_DOTS.sub("", last).rstrip()
    if not cleaned:
        return FALLBACK_FILENAME
    return _truncated(cleaned, MAX_FILENAME_BYTES)


def _truncated(name: str, limit: int) -> str:
    """Cut `name` to `limit` bytes of UTF-8 on a character boundary, keeping a short extension."""
    if len(name.encode()) <= limit:
        return name
    stem, dot, extension = name.rpartition(".")
    suffix = dot + extension if stem and len(extension.encode()) <= 16 else ""
    if suffix:
        name = stem
    room = limit - len(suffix.encode())
    return name.encode()[:room].decode(errors="ignore").rstrip() + suffix


def store_upload(
    session: Session,
    tenant_id: uuid.UUID,
    filename: str,
    content_type: str,
    chunks: Iterable[bytes],
    *,
    quota: int = 0,
) -> Upload:
    """Store an upload chunk by chunk; the caller's transaction makes it all or nothing.

    With a `quota` (bytes; 0 for none), an upload that would take the tenant's stored
    uploads past it raises `StorageQuotaExceeded` before the chunk that would: the caller's
    rollback then keeps nothing of it.
    """
    room = quota - stored_upload_bytes(session, tenant_id) if quota > 0 else None
    if room is not None and room <= 0:
        raise _over_quota(quota)
    upload = Upload(
        tenant_id=tenant_id, filename=safe_filename(filename), content_type=content_type, size=0
    )
    session.add(upload)
    session.flush()
    size = 0
    for seq, data in enumerate(chunks):
        size += len(data)
        if room is not None and size > room:
            raise _over_quota(quota)
        session.execute(insert(UploadChunk).values(upload_id=upload.id, seq=seq, data=data))
    upload.size = size
    session.flush()
    return upload


def stored_upload_bytes(session: Session, tenant_id: uuid.UUID) -> int:
    """Return the bytes of every upload the tenant keeps (one sum over its index entries)."""
    total = session.scalar(select(func.sum(Upload.size)).where(Upload.tenant_id == tenant_id))
    return int(total or 0)


def _over_quota(quota: int) -> StorageQuotaExceeded:
    return StorageQuotaExceeded(
        f"the tenant's uploads may take at most {quota} bytes, and this file would pass that",
        errors=[{"field": "file", "message": f"storage quota of {quota} bytes exceeded"}],
    )


def get_upload(session: Session, tenant_id: uuid.UUID, upload_id: uuid.UUID) -> Upload:
    """Return the tenant's upload, or `NotFound`."""
    return owned(session, Upload, upload_id, tenant_id, "upload")


def _chunks(
    session: Session,
    chunk: type[UploadChunk] | type[ArtifactChunk],
    owner: InstrumentedAttribute[uuid.UUID],
    key: uuid.UUID,
) -> Iterator[bytes]:
    """Yield stored chunks in order, one row in memory at a time."""
    seq = 0
    while (
        data := session.scalar(select(chunk.data).where(owner == key, chunk.seq == seq))
    ) is not None:
        yield data
        seq += 1


def read_upload(session: Session, upload_id: uuid.UUID) -> Iterator[bytes]:
    """Yield an upload's bytes one chunk at a time."""
    return _chunks(session, UploadChunk, UploadChunk.upload_id, upload_id)


def read_file(stream: IO[bytes], size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield a file object's bytes in chunks."""
    while data := stream.read(size):
        yield data


class ArtifactWriter:
    """Writes a job's artifact as a stream of chunks, within the job's transaction."""

    def __init__(
        self, session: Session, job_id: uuid.UUID, filename: str, content_type: str
    ) -> None:
        self._session = session
        self._job_id = job_id
        self._buffer = bytearray()
        self._seq = 0
        self._size = 0
        session.add(Artifact(job_id=job_id, filename=filename, content_type=content_type))
        session.flush()

    def write(self, data: bytes) -> None:
        """Append bytes; a full chunk goes to the database at once."""
        self._buffer += data
        while len(self._buffer) >= CHUNK_SIZE:
            self._flush(bytes(self._buffer[:CHUNK_SIZE]))
            del self._buffer[:CHUNK_SIZE]

    def close(self) -> int:
        """Write what is left and record the size; return it."""
        if self._buffer:
            self._flush(bytes(self._buffer))
            self._buffer.clear()
        self._session.execute(
            update(Artifact).where(Artifact.job_id == self._job_id).values(size=self._size)
        )
        return self._size

    def _flush(self, data: bytes) -> None:
        self._session.execute(
            insert(ArtifactChunk).values(job_id=self._job_id, seq=self._seq, data=data)
        )
        self._seq += 1
        self._size += len(data)


def get_artifact(session: Session, job_id: uuid.UUID) -> Artifact:
    """Return a job's artifact, or `NotFound` (the caller checks the job's tenant)."""
    artifact = session.get(Artifact, job_id)
    if artifact is None:
        raise NotFound(f"job {job_id} has no artifact")
    return artifact


def read_artifact(session: Session, job_id: uuid.UUID) -> Iterator[bytes]:
    """Yield an artifact's bytes one chunk at a time."""
    return _chunks(session, ArtifactChunk, ArtifactChunk.job_id, job_id)
