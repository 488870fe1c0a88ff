"""The orders domain's job types: import a CSV, roll up revenue, export a CSV."""

from __future__ import annotations

import codecs
import csv
import io
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select, text

from conveyor.errors import NotFound, PermanentError
from conveyor.files import ArtifactWriter, get_upload, read_upload
from conveyor.registry import JobContext, RetryPolicy, job_type
from domains.orders import reports
from domains.orders.models import Order
from domains.orders.rows import HEADER, OrderRow, RowError, parse_row, safe_cell

BATCH = 10_000
MAX_REJECTED_SHOWN = 100


class ImportPayload(BaseModel):
    """`orders.import_csv`: which upload to import."""

    model_config = ConfigDict(extra="forbid")
    upload_id: uuid.UUID


class RejectedRow(BaseModel):
    """A row that was not imported, and why."""

    line: int
    reason: str


class ImportResult(BaseModel):
    """What an import did."""

    imported: int
    rejected: int
    rejected_rows: list[RejectedRow]


class DateRange(BaseModel):
    """A range of days, both ends included."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    start: date = Field(alias="from")
    end: date = Field(alias="to")

    @model_validator(mode="after")
    def _ordered(self) -> DateRange:
        if self.end < self.start:
            raise ValueError("`to` is before `from`")
        if (self.end - self.start).days > 3660:
            raise ValueError("at most ten years at once")
        return self

    def bounds(self) -> tuple[datetime, datetime]:
        """Return the range as [start, end) instants in UTC."""
        return (
            datetime.combine(self.start, time(), UTC),
            datetime.combine(self.end + timedelta(days=1), time(), UTC),
        )


class ExportFilters(BaseModel):
    """Which orders to export."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    start: date | None = Field(default=None, alias="from")
    end: date | None = Field(default=None, alias="to")


class ExportPayload(BaseModel):
    """`orders.export_csv`."""

    model_config = ConfigDict(extra="forbid")
    filters: ExportFilters = Field(default_factory=ExportFilters)


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Decode UTF-8 chunks into lines, never holding more than a chunk."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    pending = ""
    for chunk in chunks:
        pending += decoder.decode(chunk)
        *complete, pending = pending.split("\n")
        for line in complete:
            yield line + "\n"
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending


_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS orders_staging (
    line int, external_id text, customer_email text, amount numeric(14, 2),
    currency char(3), ordered_at timestamptz
) ON COMMIT DROP
"""
# The last row for an external id wins, as if the file were applied line by line.
_UPSERT = """
INSERT INTO orders (tenant_id, external_id, customer_email, amount, currency, ordered_at)
SELECT DISTINCT ON (external_id)
       :tenant_id, external_id, customer_email, amount, currency, ordered_at
FROM orders_staging ORDER BY external_id, line DESC
ON CONFLICT (tenant_id, external_id) DO UPDATE SET
    customer_email = EXCLUDED.customer_email, amount = EXCLUDED.amount,
    currency = EXCLUDED.currency, ordered_at = EXCLUDED.ordered_at, imported_at = now()
"""


def _load(ctx: JobContext, batch: list[tuple[int, OrderRow]]) -> None:
    """COPY a batch into the staging table, upsert it into orders, empty the stage."""
    cursor = ctx.session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(
        "COPY orders_staging (line, external_id, customer_email, amount, currency, ordered_at)"
        " FROM STDIN"
    ) as copy:
        for line, row in batch:
            copy.write_row(
                (line, row.order_id, row.customer_email, row.amount, row.currency, row.ordered_at)
            )
    ctx.session.execute(text(_UPSERT), {"tenant_id": ctx.tenant_id})
    ctx.session.execute(text("TRUNCATE orders_staging"))


def _check_upload(ctx: JobContext, upload_id: uuid.UUID) -> csv._reader:  # type: ignore[name-defined]
    """Return a reader over the upload's records, past its header (refused if wrong)."""
    try:
        get_upload(ctx.session, ctx.tenant_id, upload_id)
    except NotFound as exc:
        raise PermanentError(exc.detail) from exc
    reader = csv.reader(_lines(read_upload(ctx.session, upload_id)))
    header = [h.strip() for h in next(reader, [])]
    if header != HEADER:
        raise PermanentError(f"the header must be {','.join(HEADER)}; found {','.join(header)}")
    return reader


def _import_records(
    ctx: JobContext, upload_id: uuid.UUID, first: int = 0, stop: int | None = None
) -> ImportResult:
    """Import the upload's records `first` to `stop` (0-based, after the header).

    The records before `first` are read but neither validated nor loaded: a chunk of a
    parallel import (`orders.import_chunk`) skips to its own.
    """
    reader = _check_upload(ctx, upload_id)
    # A first streaming pass counts the rows, so progress can say "n of total".
    total = max(0, sum(c.count(b"\n") for c in read_upload(ctx.session, upload_id)) - 1)
    if stop is not None:
        total = min(total, stop) - first
    ctx.session.execute(text(_STAGE))
    batch: list[tuple[int, OrderRow]] = []
    imported, done, rejected_count = 0, 0, 0
    rejected: list[RejectedRow] = []
    for index, fields in enumerate(reader):
        if index < first:
            continue
        if stop is not None and index >= stop:
            break
        line = reader.line_num
        done += 1
        if not fields:
            continue
        try:
            batch.append((line, parse_row(fields)))
        except RowError as exc:
            rejected_count += 1
            if len(rejected) < MAX_REJECTED_SHOWN:
                rejected.append(RejectedRow(line=line, reason=str(exc)))
        if len(batch) >= BATCH:
            _load(ctx, batch)
            imported += len(batch)
            batch.clear()
            ctx.progress(done, total, f"{imported} imported, {rejected_count} rejected")
    if batch:
        _load(ctx, batch)
        imported += len(batch)
    ctx.progress(total, total, f"{imported} imported, {rejected_count} rejected")
    return ImportResult(imported=imported, rejected=rejected_count, rejected_rows=rejected)


@job_type(
    "orders.import_csv",
    payload=ImportPayload,
    result=ImportResult,
    retry=RetryPolicy(max_attempts=3),
    time_limit=3600,
)
def import_csv(ctx: JobContext, payload: ImportPayload) -> ImportResult:
    """Stream an uploaded CSV into `orders`: valid rows upserted in batches, bad ones reported."""
    return _import_records(ctx, payload.upload_id)


class SplitPayload(BaseModel):
    """`orders.import_csv_parallel`: which upload, in how many chunks at most."""

    model_config = ConfigDict(extra="forbid")
    upload_id: uuid.UUID
    chunks: int = Field(default=4, ge=1, le=64)
    # Below this many rows a chunk is not worth its job.
    min_rows: int = Field(default=10_000, ge=1)


class ChunkPayload(BaseModel):
    """`orders.import_chunk`: records `first` to `stop` of an upload."""

    model_config = ConfigDict(extra="forbid")
    upload_id: uuid.UUID
    first: int = Field(ge=0)
    stop: int = Field(ge=1)


class Split(BaseModel):
    """What the split did: how many rows, in how many chunks."""

    rows: int
    chunks: int


@job_type(
    "orders.import_csv_parallel",
    payload=SplitPayload,
    result=Split,
    retry=RetryPolicy(max_attempts=3),
    time_limit=600,
)
def import_csv_parallel(ctx: JobContext, payload: SplitPayload) -> Split:
    """Import a CSV as a workflow: chunk jobs that import in parallel, then a summary.

    The split checks the header and counts the records, then adds one `orders.import_chunk`
    per chunk and an `orders.import_summary` that depends on them all (its result is the
    import's: `imported`, `rejected`, `rejected_rows`), committed with its own success.
    Chunks run at once, so unlike `orders.import_csv`, which applies the file line by line,
    two rows of one `order_id` in different chunks leave either one.
    """
    rows = sum(1 for _ in _check_upload(ctx, payload.upload_id))
    chunks = max(1, min(payload.chunks, rows // payload.min_rows))
    size = -(-rows // chunks) if rows else 1
    refs = []
    for n, first in enumerate(range(0, max(rows, 1), size)):
        refs.append(f"chunk-{n}")
        chunk = {"upload_id": str(payload.upload_id), "first": first, "stop": first + size}
        ctx.add_jobs({"ref": refs[-1], "type": "orders.import_chunk", "payload": chunk})
    ctx.add_jobs({"ref": "summary", "type": "orders.import_summary", "depends_on": refs})
    return Split(rows=rows, chunks=len(refs))


@job_type(
    "orders.import_chunk",
    payload=ChunkPayload,
    result=ImportResult,
    retry=RetryPolicy(max_attempts=3),
    time_limit=3600,
)
def import_chunk(ctx: JobContext, payload: ChunkPayload) -> ImportResult:
    """Import one chunk of a parallel import."""
    return _import_records(ctx, payload.upload_id, payload.first, payload.stop)


class NoPayload(BaseModel):
    """Nothing: the summary reads its dependencies' results."""

    model_config = ConfigDict(extra="forbid")


@job_type("orders.import_summary", payload=NoPayload, result=ImportResult)
def import_summary(ctx: JobContext, payload: NoPayload) -> ImportResult:  # noqa: ARG001
    """Sum the chunks' results into the import's (rejected rows in line order)."""
    results = [ImportResult.model_validate(dep["result"]) for dep in ctx.dependencies.values()]
    rejected = sorted((row for r in results for row in r.rejected_rows), key=lambda r: r.line)
    return ImportResult(
        imported=sum(r.imported for r in results),
        rejected=sum(r.rejected for r in results),
        rejected_rows=rejected[:MAX_REJECTED_SHOWN],
    )


_ROLLUP_CLEAR = """
DELETE FROM daily_revenue WHERE tenant_id = :tenant_id AND day BETWEEN :start AND :end
"""
_ROLLUP = """
INSERT INTO daily_revenue (tenant_id, day, currency, orders, total, updated_at)
SELECT tenant_id, (ordered_at AT TIME ZONE 'UTC')::date, currency, count(*), sum(amount), now()
FROM orders
WHERE tenant_id = :tenant_id AND ordered_at >= :since AND ordered_at < :until
GROUP BY 1, 2, 3
ON CONFLICT (tenant_id, day, currency) DO UPDATE SET
    orders = EXCLUDED.orders, total = EXCLUDED.total, updated_at = now()
"""


@job_type("orders.daily_revenue", payload=DateRange, retry=RetryPolicy(max_attempts=3))
def daily_revenue(ctx: JobContext, payload: DateRange) -> dict[str, Any]:
    """Recompute the rollup for the range (idempotent), then invalidate cached reports."""
    since, until = payload.bounds()
    params = {"tenant_id": ctx.tenant_id, "start": payload.start, "end": payload.end}
    ctx.session.execute(text(_ROLLUP_CLEAR), params)
    written = ctx.session.execute(
        text(_ROLLUP), {"tenant_id": ctx.tenant_id, "since": since, "until": until}
    ).rowcount  # type: ignore[attr-defined]
    redis, tenant_id = ctx.redis, ctx.tenant_id
    if redis is not None:
        # Before the commit too: a client that sees this job succeeded must not be served
        # a report cached before it (the after-commit bump alone raced with that read).
        # After the commit: a report cached from old rows while this commit was under way.
        reports.invalidate(redis, tenant_id)
        ctx.after_commit(lambda: reports.invalidate(redis, tenant_id))
    return {"days": written}


@job_type("orders.export_csv", payload=ExportPayload, retry=RetryPolicy(max_attempts=3))
def export_csv(ctx: JobContext, payload: ExportPayload) -> dict[str, int]:
    """Write the matching orders to a CSV artifact, streamed from the database in chunks."""
    filters = payload.filters
    query = select(
        Order.external_id, Order.customer_email, Order.amount, Order.currency, Order.ordered_at
    ).where(Order.tenant_id == ctx.tenant_id)
    if filters.currency is not None:
        query = query.where(Order.currency == filters.currency)
    if filters.start is not None:
        query = query.where(Order.ordered_at >= datetime.combine(filters.start, time(), UTC))
    if filters.end is not None:
        until = datetime.combine(filters.end + timedelta(days=1), time(), UTC)
        query = query.where(Order.ordered_at < until)
    artifact = ArtifactWriter(ctx.session, ctx.job_id, f"orders-{ctx.job_id}.csv", "text/csv")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(HEADER)
    rows = 0
    result = ctx.session.execute(
        query.order_by(Order.external_id).execution_options(yield_per=5000)
    )
    for external_id, email, amount, currency, ordered_at in result:
        writer.writerow(
            [safe_cell(external_id), safe_cell(email), amount, currency, ordered_at.isoformat()]
        )
        rows += 1
        if buffer.tell() >= 256 * 1024:
            artifact.write(buffer.getvalue().encode())
            buffer.seek(0)
            buffer.truncate()
    artifact.write(buffer.getvalue().encode())
    return {"rows": rows, "bytes": artifact.close()}
