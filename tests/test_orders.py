"""The orders domain end to end: upload, import, roll up, report, export (real worker)."""

from __future__ import annotations

import csv
import io
import uuid
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from conveyor.settings import Settings
from domains.orders.models import Order
from tests.conftest import wait_for
from tests.test_api import assert_problem
from tests.test_e2e import finished

pytestmark = pytest.mark.e2e

GOOD = [
    ["A-1", "Ann@Example.com", "10.50", "EUR", "2026-03-01T10:00:00+01:00"],
    ["A-2", "bob@example.com", "5", "EUR", "2026-03-01T23:30:00+00:00"],
    ["=1+1", "+cal@example.com", "7.25", "USD", "2026-03-02T08:00:00Z"],
    ["A-4", "dan@example.com", "-3.00", "USD", "2026-03-02T09:00:00+00:00"],
]
BAD = [
    (["B-1", "not-an-email", "1.00", "EUR", "2026-03-01T10:00:00Z"], "customer_email"),
    (["B-2", "x@example.com", "1.005", "EUR", "2026-03-01T10:00:00Z"], "2 decimal places"),
    (["B-3", "x@example.com", "ten", "EUR", "2026-03-01T10:00:00Z"], "not a decimal"),
    (["B-4", "x@example.com", "1.00", "EURO", "2026-03-01T10:00:00Z"], "ISO 4217"),
    (["B-5", "x@example.com", "1.00", "EUR", "2026-03-01 10:00:00"], "time zone"),
    (["B-6", "x@example.com", "1.00", "EUR"], "expected 5 fields"),
]


def csv_bytes(
    rows: list[list[str]], header: str = "order_id,customer_email,amount,currency,ordered_at"
) -> bytes:
    out = io.StringIO()
    out.write(header + "\n")
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


def upload(
    client: Any,
    auth: dict[str, str],
    data: bytes,
    name: str = "orders.csv",
    content_type: str = "text/csv",
) -> Any:
    return client.post(
        "/v1/uploads",
        data={"file": (io.BytesIO(data), name, content_type)},
        headers=auth,
        content_type="multipart/form-data",
    )


def run(client: Any, auth: dict[str, str], type_name: str, payload: dict[str, Any]) -> Any:
    job = client.post("/v1/jobs", json={"type": type_name, "payload": payload}, headers=auth)
    assert job.status_code == 202, job.get_json()
    return wait_for(lambda: finished(client, auth, job.get_json()["id"]), timeout=60)


def test_import_rollup_report_and_export(
    worker: Any, client: Any, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    rows = [GOOD[0], BAD[0][0], GOOD[1], BAD[1][0], GOOD[2], BAD[2][0], GOOD[3]]
    rows += [bad for bad, _ in BAD[3:]]
    # As curl -F sends it: a .csv name, application/octet-stream.
    uploaded = upload(client, auth, csv_bytes(rows), content_type="application/octet-stream")
    assert uploaded.status_code == 201, uploaded.get_json()
    upload_id = uploaded.get_json()["id"]
    assert uploaded.get_json()["size"] > 0

    first = run(client, auth, "orders.import_csv", {"upload_id": upload_id})
    assert first["state"] == "succeeded", first
    result = first["result"]
    assert (result["imported"], result["rejected"]) == (4, 6)
    lines = {r["line"]: r["reason"] for r in result["rejected_rows"]}
    assert sorted(lines) == [3, 5, 7, 9, 10, 11]
    for (_, reason), line in zip(BAD, sorted(lines), strict=True):
        assert reason in lines[line]

    # The same file again changes nothing.
    again = run(client, auth, "orders.import_csv", {"upload_id": upload_id})
    assert again["result"]["imported"] == 4
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Order)) == 4
        ann = session.scalar(select(Order).where(Order.external_id == "A-1"))
        assert (ann.customer_email, ann.amount, ann.currency) == (
            "ann@example.com",
            Decimal("10.50"),
            "EUR",
        )

    report = "/v1/reports/daily-revenue?from=2026-03-01&to=2026-03-31"
    empty = client.get(report, headers=auth)
    assert (empty.get_json()["items"], empty.headers["X-Cache"]) == ([], "miss")
    assert client.get(report, headers=auth).headers["X-Cache"] == "hit"
    rollup = run(client, auth, "orders.daily_revenue", {"from": "2026-03-01", "to": "2026-03-31"})
    assert rollup["state"] == "succeeded"
    fresh = client.get(report, headers=auth)  # the rollup invalidated the cached report
    assert fresh.headers["X-Cache"] == "miss"
    items = fresh.get_json()["items"]
    with sessions() as session:
        expected = session.execute(
            text(
                "SELECT (ordered_at AT TIME ZONE 'UTC')::date::text, currency, count(*), "
                "sum(amount)::text FROM orders GROUP BY 1, 2 ORDER BY 1, 2"
            )
        ).all()
    assert [(i["day"], i["currency"], i["orders"], i["total"]) for i in items] == [
        tuple(row) for row in expected
    ]
    eur = client.get(report + "&currency=EUR", headers=auth).get_json()["items"]
    assert {i["currency"] for i in eur} == {"EUR"}

    export = run(client, auth, "orders.export_csv", {"filters": {}})
    assert export["result"]["rows"] == 4
    download = client.get(f"/v1/jobs/{export['id']}/artifact", headers=auth)
    assert download.status_code == 200
    assert download.mimetype == "text/csv"
    assert download.headers["Content-Disposition"].startswith("attachment; filename=")
    exported = list(csv.reader(io.StringIO(download.get_data(as_text=True))))
    assert exported[0] == ["order_id", "customer_email", "amount", "currency", "ordered_at"]
    by_id = {row[0]: row for row in exported[1:]}
    assert set(by_id) == {"A-1", "A-2", "'=1+1", "A-4"}  # formula injection defused
    assert by_id["'=1+1"][1] == "'+cal@example.com"
    assert by_id["A-4"][2] == "-3.00"  # numbers stay numbers
    assert by_id["A-1"][2] == "10.50"


def test_a_wrong_header_fails_the_import_clearly(
    worker: Any, client: Any, auth: dict[str, str]
) -> None:
    uploaded = upload(client, auth, csv_bytes([GOOD[0]], header="id,email,amount,currency,at"))
    body = run(client, auth, "orders.import_csv", {"upload_id": uploaded.get_json()["id"]})
    assert (body["state"], body["attempts"]) == ("failed", 1)
    assert "header must be order_id,customer_email" in body["error"]["message"]
    missing = run(client, auth, "orders.import_csv", {"upload_id": str(uuid.uuid4())})
    assert missing["state"] == "failed"
    assert "no upload" in missing["error"]["message"]


def test_bad_uploads_are_refused(
    client: Any, auth: dict[str, str], settings: Settings, sessions: sessionmaker[Session]
) -> None:
    assert_problem(upload(client, auth, b"a,b\n", name="orders.txt"), 415)
    assert_problem(upload(client, auth, b"a,b\n", content_type="image/png"), 415)
    assert_problem(upload(client, auth, csv_bytes([]) + b"\xff\xfe broken\n"), 422)
    assert_problem(client.post("/v1/uploads", json={"file": "x"}, headers=auth), 415)
    small = create_app(settings.model_copy(update={"max_upload_bytes": 2048}))
    assert_problem(upload(small.test_client(), auth, b"x" * 4096), 413)
    small.extensions["conveyor"].engine.dispose()
    with sessions() as session:
        assert session.scalar(text("SELECT count(*) FROM uploads")) == 0
    assert_problem(
        client.get("/v1/reports/daily-revenue?from=2026-03-02&to=2026-03-01", headers=auth), 422
    )
    assert_problem(client.get(f"/v1/jobs/{uuid.uuid4()}/artifact", headers=auth), 404)


def test_a_parallel_import_is_a_workflow_whose_summary_matches_the_single_job(
    worker: Any, client: Any, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    from worker.dispatcher import Dispatcher

    good = [
        [f"P-{n}", f"p{n}@example.com", "1.00", "EUR", "2026-03-01T10:00:00Z"] for n in range(24)
    ]
    rows = [*good[:5], BAD[0][0], *good[5:17], BAD[1][0], *good[17:]]
    uploaded = upload(client, auth, csv_bytes(rows))
    upload_id = uploaded.get_json()["id"]
    dispatcher = Dispatcher.for_app(worker)  # releases the summary once the chunks are done
    dispatcher.start()
    try:
        payload = {"upload_id": upload_id, "chunks": 3, "min_rows": 5}
        split = run(client, auth, "orders.import_csv_parallel", payload)
        assert split["state"] == "succeeded", split
        assert split["result"] == {"rows": 26, "chunks": 3}
        flow_id = split["workflow_id"]

        def settled() -> Any:
            flow = client.get(f"/v1/workflows/{flow_id}", headers=auth).get_json()
            return flow if flow["state"] != "running" else None

        flow = wait_for(settled, timeout=60)
    finally:
        dispatcher.stop()
    assert flow["state"] == "succeeded"
    jobs = {job["ref"]: job for job in flow["jobs"]}
    assert sorted(jobs) == ["chunk-0", "chunk-1", "chunk-2", "parent", "summary"]
    assert jobs["summary"]["depends_on"] == ["chunk-0", "chunk-1", "chunk-2"]
    summary = jobs["summary"]["result"]
    assert (summary["imported"], summary["rejected"]) == (24, 2)
    assert [r["line"] for r in summary["rejected_rows"]] == [7, 20]
    single = run(client, auth, "orders.import_csv", {"upload_id": upload_id})["result"]
    assert single == summary
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Order)) == 24
