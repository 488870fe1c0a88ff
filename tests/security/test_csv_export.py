"""CSV export defuses every cell opening a spreadsheet may read as a formula."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest

from domains.orders.rows import safe_cell
from tests.test_orders import csv_bytes, run, upload

pytestmark = pytest.mark.e2e

# OWASP's formula starts, their full-width forms, and the pipe.
DANGEROUS = ["=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20", "|"]


@pytest.mark.parametrize("start", DANGEROUS)
def test_a_cell_starting_a_formula_is_prefixed_with_a_quote(start: str) -> None:
    assert safe_cell(f"{start}1+1") == f"'{start}1+1"


@pytest.mark.parametrize("value", ["", "A-1", "1+1", "'=1", "%20", " =1", "\u30001", "x=1"])
def test_other_cells_are_left_alone(value: str) -> None:
    assert safe_cell(value) == value


def test_an_export_defuses_full_width_and_pipe_starts(
    worker: Any, client: Any, auth: dict[str, str]
) -> None:
    rows = [
        ["\uff1d1+1", "x1@example.com", "1.00", "EUR", "2026-03-01T10:00:00Z"],
        ["\uff0bA", "\uff20sum@example.com", "1.00", "EUR", "2026-03-01T10:00:00Z"],
        ["\uff0dB", "x2@example.com", "1.00", "EUR", "2026-03-01T10:00:00Z"],
        ["\uff20C", "x3@example.com", "1.00", "EUR", "2026-03-01T10:00:00Z"],
        ["|calc", "|x@example.com", "1.00", "EUR", "2026-03-01T10:00:00Z"],
        ["=2+2", "+y@example.com", "1.00", "EUR", "2026-03-01T10:00:00Z"],
        ["plain", "z@example.com", "-1.00", "EUR", "2026-03-01T10:00:00Z"],
    ]
    uploaded = upload(client, auth, csv_bytes(rows))
    imported = run(client, auth, "orders.import_csv", {"upload_id": uploaded.get_json()["id"]})
    assert imported["result"]["imported"] == len(rows), imported
    export = run(client, auth, "orders.export_csv", {"filters": {}})
    assert export["state"] == "succeeded", export
    text = client.get(f"/v1/jobs/{export['id']}/artifact", headers=auth).get_data(as_text=True)
    exported = {row[0]: row for row in list(csv.reader(io.StringIO(text)))[1:]}
    assert set(exported) == {
        "'\uff1d1+1",
        "'\uff0bA",
        "'\uff0dB",
        "'\uff20C",
        "'|calc",
        "'=2+2",
        "plain",
    }
    assert exported["'\uff0bA"][1] == "'\uff20sum@example.com"
    assert exported["'|calc"][1] == "'|x@example.com"
    assert exported["plain"][2] == "-1.00"  # numbers stay numbers
