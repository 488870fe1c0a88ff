"""Files in PostgreSQL, written and read in chunks: uploads for jobs, artifacts from jobs."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from typing import IO

from sqlalchemy import insert, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from conveyor.errors import NotFound
from conveyor.models import Artifact, ArtifactChunk, Upload, UploadChunk

CHUNK_SIZE = 1024 * 1024


def store_upload(
    session: Session,
    tenant_id: uuid.UUID,
    filename: str,
    content_type: str,
    chunks: Iterable[bytes],
) -> Upload:
    """Store an upload chunk by chunk; the caller's transaction makes it all or nothing."""
    upload = Upload(tenant_id=tenant_id, filename=filename, content_type=content_type, size=0)
    session.add(upload)
    session.flush()
    size = 0
    for seq, data in enumerate(chunks):
        session.execute(insert(UploadChunk).values(upload_id=upload.id, seq=seq, data=data))
        size += len(data)
    upload.size = size
    session.flush()
    return upload


def get_upload(session: Session, tenant_id: uuid.UUID, upload_id: uuid.UUID) -> Upload:
    """Return the tenant's upload, or `NotFound`."""
    upload = session.scalar(
        select(Upload).where(Upload.id == upload_id, Upload.tenant_id == tenant_id)
    )
    if upload is None:
        raise NotFound(f"there is no upload {upload_id}")
    return upload


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
