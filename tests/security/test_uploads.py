"""Uploads: a client's file name is a label, never a path; a tenant's stored bytes are capped."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.auth.bootstrap import Identity
from conveyor.errors import StorageQuotaExceeded
from conveyor.files import CHUNK_SIZE, safe_filename, store_upload
from conveyor.models import Upload, UploadChunk
from conveyor.settings import Settings
from tests.conftest import bearer
from tests.factories import other_tenant, tenant_factory
from tests.test_api import assert_problem
from tests.test_orders import upload

LONG = "ü" * 200 + ".csv"  # 404 bytes of UTF-8


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("../../etc/passwd.csv", "passwd.csv"),
        ("..\\..\\x.csv", "x.csv"),
        ("C:\\Users\\ann\\orders.csv", "orders.csv"),
        ("a\x00b.csv", "ab.csv"),
        ("a\r\nX-Injected: 1.csv", "aX-Injected: 1.csv"),
        # Right-to-left override: this .exe would be shown as `invoiceexe.csv`.
        ("invoice\u202evsc.exe", "invoicevsc.exe"),
        ("\u202ecsv.exe", "csv.exe"),
        ("zero\u200bwidth\ufeff.csv", "zerowidth.csv"),
        ("line\u2028break.csv", "linebreak.csv"),
        (".hidden.csv", "hidden.csv"),
        (" . .. x.csv ", "x.csv"),
        ("e\u0301te\u0301.csv", "\u00e9t\u00e9.csv"),  # decomposed é, stored composed (NFC)
        ("../", "upload.csv"),
        ("\x00\u202e..", "upload.csv"),
        ("plain orders.csv", "plain orders.csv"),
    ],
)
def test_a_file_name_is_kept_as_one_clean_component(sent: str, stored: str) -> None:
    assert safe_filename(sent) == stored
    assert safe_filename(stored) == stored  # cleaning twice changes nothing


def test_a_long_file_name_is_cut_to_255_bytes_keeping_its_extension() -> None:
    cut = safe_filename(LONG)
    assert len(cut.encode()) <= 255
    assert cut.endswith(".csv")
    assert cut.startswith("ü" * 125)  # cut on a character boundary
    assert safe_filename("x" * 300).encode() == b"x" * 255


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("../../etc/passwd.csv", "passwd.csv"),
        ("..\\..\\x.csv", "x.csv"),
        ("orders\u202e.csv", "orders.csv"),
        ("../.csv", "csv"),  # nothing but the extension is left: no longer a .csv name
        (LONG, safe_filename(LONG)),
    ],
)
def test_the_api_stores_and_answers_the_clean_name(
    client: Any, auth: dict[str, str], sessions: sessionmaker[Session], sent: str, stored: str
) -> None:
    response = upload(client, auth, b"a,b\n", name=sent)
    if not stored.endswith(".csv"):
        assert_problem(response, 415)
        return
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["filename"] == stored
    with sessions() as session:
        row = session.get_one(Upload, uuid.UUID(response.get_json()["id"]))
        assert row.filename == stored


def test_an_upload_past_the_tenants_storage_quota_is_413_and_keeps_nothing(
    make_app: Callable[..., Any],
    identity: Identity,
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    assert Settings.model_fields["tenant_max_upload_bytes"].default == 1024**3  # 1 GiB unless set
    client = make_app(tenant_max_upload_bytes=10_000).test_client()
    auth = bearer(identity.token)
    assert upload(client, auth, b"x" * 6_000).status_code == 201
    refused = upload(client, auth, b"y" * 6_000)
    body = assert_problem(refused, 413)
    assert body["type"].endswith("/storage-quota-exceeded")
    assert body["title"] == "Storage quota exceeded"
    assert [e["field"] for e in body["errors"]] == ["file"]
    assert stored(sessions) == (1, 6_000)
    assert upload(client, auth, b"z" * 4_000).status_code == 201  # exactly up to the quota
    assert_problem(upload(client, auth, b"a"), 413)  # no room left at all
    assert stored(sessions) == (2, 10_000)
    # Another tenant's room is its own.
    theirs = bearer(other_tenant(sessions, settings).token)
    assert upload(client, theirs, b"x" * 6_000).status_code == 201
    # 0 means no quota.
    unlimited = make_app(tenant_max_upload_bytes=0).test_client()
    assert upload(unlimited, auth, b"x" * 6_000).status_code == 201


def stored(sessions: sessionmaker[Session]) -> tuple[int, int]:
    """Return how many uploads are stored and the bytes of their chunks."""
    with sessions() as session:
        uploads = session.scalar(select(func.count()).select_from(Upload)) or 0
        chunks = session.scalar(select(func.sum(func.length(UploadChunk.data)))) or 0
    return uploads, chunks


def test_an_endless_upload_stops_at_the_first_chunk_past_the_quota(db_session: Session) -> None:
    tenant = tenant_factory(db_session)
    read: list[int] = []

    def endless() -> Iterator[bytes]:
        for n in itertools.count():
            read.append(n)
            yield b"x" * CHUNK_SIZE

    with pytest.raises(StorageQuotaExceeded):
        store_upload(
            db_session, tenant.id, "big.csv", "text/csv", endless(), quota=CHUNK_SIZE * 5 // 2
        )
    assert read == [0, 1, 2]  # the third chunk passes 2.5 chunks' worth: nothing more is read
