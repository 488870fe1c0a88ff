"""`POST /v1/uploads` (CSV files for jobs) and `GET /v1/jobs/{id}/artifact` (files from jobs)."""

from __future__ import annotations

import codecs
import uuid
from collections.abc import Iterator

from flask import Response, jsonify, request, stream_with_context
from pydantic import BaseModel

from api.auth import current_principal, requires
from api.openapi import responses, secured_blueprint
from api.requests import parse_id
from api.schemas import JobPath
from api.services import services
from conveyor.auth.roles import Permission
from conveyor.errors import UnsupportedMediaType, ValidationFailed
from conveyor.files import get_artifact, read_artifact, read_file, safe_filename, store_upload
from conveyor.ledger.reads import job_row

bp = secured_blueprint("files", __name__, "files")
# curl -F and many clients send files as application/octet-stream; the name and the
# UTF-8 check decide then.
CSV_TYPES = {
    "text/csv",
    "application/csv",
    "application/vnd.ms-excel",
    "text/plain",
    "application/octet-stream",
}


def _utf8_checked(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Pass chunks through, refusing the upload at the first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    for chunk in chunks:
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            at = offset + exc.start
            raise ValidationFailed(
                f"the file is not UTF-8 text (byte {at})",
                errors=[{"field": "file", "message": f"invalid UTF-8 at byte {at}"}],
            ) from exc
        offset += len(chunk)
        yield chunk
    decoder.decode(b"", final=True)


class Uploaded(BaseModel):
    """A stored upload, to name in a job's payload."""

    id: uuid.UUID
    filename: str
    size: int


# Not a flask-openapi3 `form` model: that would read the body before the view raises the
# request's size limit to the upload limit.
UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}},
            }
        }
    },
}


@bp.post(
    "/v1/uploads",
    responses=responses({201: Uploaded}, 413, 415, 422),
    openapi_extensions={"requestBody": UPLOAD_BODY},
)
@requires(Permission.SUBMIT)
def upload() -> tuple[Response, int]:
    """Store a CSV file (multipart field `file`) for a job to read; 201 with its id.

    413 when the file passes `CONVEYOR_MAX_UPLOAD_BYTES` or would take the tenant's uploads
    past `CONVEYOR_TENANT_MAX_UPLOAD_BYTES`; the answer names the file as it was stored.
    """
    principal = current_principal()
    svc = services()
    # Uploads may be far larger than JSON bodies (Flask 3.1: per-request limit).
    request.max_content_length = svc.settings.max_upload_bytes
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType("send the file as multipart/form-data, field `file`")
    file = request.files.get("file")
    if file is None or not file.filename:
        raise ValidationFailed(
            "no file in the upload", errors=[{"field": "file", "message": "required"}]
        )
    # The name is a label (never a path); the stored, cleaned one is what the check sees.
    filename = safe_filename(file.filename)
    if not filename.lower().endswith(".csv") or file.mimetype not in CSV_TYPES:
        raise UnsupportedMediaType("only CSV files (.csv, text/csv) are accepted")
    with svc.sessions.begin() as session:
        stored = store_upload(
            session,
            principal.tenant_id,
            filename,
            "text/csv",
            _utf8_checked(read_file(file.stream)),
            quota=svc.settings.tenant_max_upload_bytes,
        )
        body = {"id": str(stored.id), "filename": stored.filename, "size": stored.size}
    return jsonify(body), 201


@bp.get(
    "/v1/jobs/<job_id>/artifact",
    responses=responses(
        {
            200: {
                "description": "The file, as an attachment.",
                # The type the job gave its file, e.g. text/csv.
                "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
        404,
    ),
)
@requires(Permission.READ)
def artifact(path: JobPath) -> Response:
    """Download the file a job produced, streamed from the database."""
    return artifact_download(parse_id(path.job_id, "job"))


def artifact_download(key: uuid.UUID) -> Response:
    """Stream the file the caller's job produced, as an attachment (`NotFound` if none)."""
    principal = current_principal()
    svc = services()
    with svc.sessions() as session:
        job_row(session, key, principal.tenant_id)
        found = get_artifact(session, key)
        filename, content_type, size = found.filename, found.content_type, found.size

    def chunks() -> Iterator[bytes]:
        with svc.sessions() as session:
            yield from read_artifact(session, key)

    response = Response(stream_with_context(chunks()), mimetype=content_type)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    response.headers["Content-Length"] = str(size)
    return response
