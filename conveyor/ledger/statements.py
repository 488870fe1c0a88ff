"""The ledger's statements: every transition is one guarded UPDATE derived from the table.

`transition()` builds, for a move of `conveyor.ledger.states.TRANSITIONS`, the one statement
that makes it: an `UPDATE jobs ... WHERE state IN (<the move's sources>) AND <guards>` that
sets the target state, bumps the row's `version` and sets or clears `finished_at`, inserts
the move's `job_events` row (from and to state, attempt, detail) and returns every column
of the moved rows with `from_state` and `event_id`. Entering a finished state also inserts,
in the same statement, one `webhooks.deliver` job (and its first event) per enabled webhook
of the tenant that listens for that event and one for the job's callback URL: deliveries
exist exactly when the finish commits, whether or not the unit of work has a transaction.

A move with one source guards on it alone; a move with several reads the rows it moves in
a locking CTE first (`pick` decides which: by id, or a bounded `SKIP LOCKED` batch), the
only way to record which state each row left. Statements are built once per shape and
cached: building and hashing these CTEs per call cost a worker more than PostgreSQL spent
running them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    CTE,
    BigInteger,
    ColumnElement,
    Select,
    String,
    and_,
    bindparam,
    cast,
    column,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.sql.selectable import TextualSelect

from conveyor.ledger.states import TRANSITIONS, JobState, Move, Waiting
from conveyor.models import Job, JobEvent, Limit, UniqueKey, Webhook
from conveyor.webhooks import DELIVER_TYPE, DELIVERY_ATTEMPTS

# Every column of a job: a transition returns the whole row, so its live view is exactly
# what the ledger now holds, with no further round trip.
ROW = tuple(Job.__table__.c)
NOW = bindparam("p_now", type_=Job.finished_at.type)
DETAIL = bindparam("p_detail", type_=JobEvent.detail.type)
Pick = Callable[[Select[Any]], Select[Any]]


def param(column: str) -> Any:
    """Return the bound parameter that sets `column` (named `p_<column>`)."""
    return bindparam(f"p_{column}", type_=Job.__table__.c[column].type)


def transition(
    move: Move,
    *,
    where: Sequence[ColumnElement[bool]] = (),
    values: Mapping[str, Any] | None = None,
    pick: Pick | None = None,
) -> Select[Any]:
    """Return the one statement that makes `move` for the rows `where` (and `pick`) select.

    Parameters it always takes: `p_now` (a finish's time, and its deliveries'), `p_detail`
    (the event's detail, or None); `values` and `where` may bind more.
    """
    t = TRANSITIONS[move]
    guard = Job.state.in_(sorted(t.sources))
    # A job moved on waits for nothing, but a backoff's end (the dispatcher says what else).
    waits = Waiting.SCHEDULE if t.target == JobState.RETRYING else None
    sets: dict[str, Any] = {
        "state": t.target,
        "version": Job.version + 1,
        "waiting_for": waits,
        **(values or {}),
    }
    if t.target.is_terminal:
        sets.setdefault("finished_at", NOW)
    elif any(source.is_terminal for source in t.sources):
        sets["finished_at"] = None
    if len(t.sources) == 1 and pick is None:
        (source,) = t.sources
        moved = (
            update(Job)
            .where(guard, *where)
            .values(**sets)
            .returning(*ROW, literal(source, Job.state.type).label("from_state"))
            .cte("moved")
        )
    else:
        chosen: Any = select(Job.id, Job.state).where(guard, *where)
        old = (pick(chosen) if pick is not None else chosen.with_for_update()).cte("old")
        moved = (
            update(Job)
            .where(Job.id == old.c.id, guard)
            .values(**sets)
            .returning(*ROW, old.c.state.label("from_state"))
            .cte("moved")
        )
    event = (
        insert(JobEvent)
        .from_select(
            ["job_id", "from_state", "to_state", "attempt", "detail"],
            select(
                moved.c.id,
                moved.c.from_state,
                literal(t.target, JobEvent.to_state.type),
                moved.c.attempt,
                DETAIL,
            ),
            include_defaults=False,
        )
        .returning(JobEvent.id, JobEvent.job_id)
        .cte("event")
    )
    statement = select(moved, event.c.id.label("event_id")).join_from(
        moved, event, moved.c.id == event.c.job_id
    )
    if t.target.is_terminal:
        statement = statement.add_cte(*_deliveries(moved, t.target))
    if t.target.is_terminal or any(source.is_terminal for source in t.sources):
        # A finished job releases its unique key; one a person retries holds it again.
        statement = statement.add_cte(_unique_keys(moved, released=t.target.is_terminal))
    if JobState.RUNNING in t.sources:
        statement = statement.add_cte(_freed(moved))
    return statement


def _unique_keys(moved: CTE, *, released: bool) -> CTE:
    """Return the CTE that releases (or takes back) the unique keys the moved jobs hold."""
    return (
        update(UniqueKey)
        .where(UniqueKey.job_id == moved.c.id)
        .values(released_at=NOW if released else None)
        .cte("unique_keys_moved")
    )


TYPE_LIMIT_PREFIX = "type:"


def gates_of(tenant_id: Any, limit_key: Any, job_type: Any) -> ColumnElement[bool]:
    """Return the condition that picks the limits a job counts against.

    Its tenant's limit named by its `limit_key`, and the limit its job type declares in
    code (tenant-less, keyed `type:<name>`).
    """
    return or_(
        and_(Limit.tenant_id == tenant_id, Limit.key == limit_key),
        and_(Limit.tenant_id.is_(None), Limit.key == TYPE_LIMIT_PREFIX + job_type),
    )


def _freed(moved: CTE) -> CTE:
    """Return the CTE that gives back the limit slots of jobs leaving `running`.

    Their limits are locked in id order first (a claim locks them in that order too, so
    the two never deadlock); a freed slot wakes the dispatcher once this commits.
    """
    exits = (
        select(Limit.id, func.count().label("n"))
        .join(moved, gates_of(moved.c.tenant_id, moved.c.limit_key, moved.c.type))
        .group_by(Limit.id)
        .cte("exits")
    )
    locked = (
        select(Limit.id)
        .where(Limit.id.in_(select(exits.c.id)))
        .order_by(Limit.id)
        .with_for_update()
    )
    return (
        update(Limit)
        .where(Limit.id == exits.c.id, Limit.id.in_(locked))
        .values(running=func.greatest(Limit.running - exits.c.n, 0))
        .returning(Limit.id, func.pg_notify(DISPATCH_CHANNEL, Limit.key))
        .cte("freed")
    )


# The channel on which the ledger tells the dispatcher that work or room appeared.
DISPATCH_CHANNEL = "conveyor_dispatch"


def _deliveries(moved: CTE, target: JobState) -> tuple[CTE, CTE]:
    """Return the CTEs that insert the deliveries of jobs entering a finished state.

    One per enabled webhook of the job's tenant listening for `job.<target>`, and one to
    the job's callback URL; never for a delivery itself (deliveries of deliveries would
    never end). They are `scheduled` for now: the promoter publishes them once committed.
    """
    event = f"job.{target.value}"
    undelivered = moved.c.type != DELIVER_TYPE
    listening = select(
        moved.c.id.label("job_id"),
        moved.c.tenant_id,
        moved.c.queue,
        Webhook.url.label("url"),
        Webhook.id.label("webhook_id"),
        moved.c.trace_context,
    ).join(
        Webhook,
        and_(
            Webhook.tenant_id == moved.c.tenant_id,
            Webhook.enabled.is_(True),
            Webhook.events.contains(literal([event], ARRAY(String(50)))),
            undelivered,
        ),
    )
    calling = select(
        moved.c.id,
        moved.c.tenant_id,
        moved.c.queue,
        moved.c.callback_url,
        cast(null(), UUID(as_uuid=True)),
        moved.c.trace_context,
    ).where(moved.c.callback_url.is_not(None), undelivered)
    targets = union_all(listening, calling).cte("targets")
    payload = func.jsonb_build_object(
        "job_id",
        targets.c.job_id,
        "event",
        event,
        "url",
        targets.c.url,
        "webhook_id",
        targets.c.webhook_id,
    )
    columns = {
        "id": func.gen_random_uuid(),
        "tenant_id": targets.c.tenant_id,
        "type": literal(DELIVER_TYPE),
        "queue": targets.c.queue,
        "state": literal(JobState.SCHEDULED, Job.state.type),
        "payload": payload,
        "tags": literal([], ARRAY(String(64))),
        "metadata": literal({}, JSONB),
        "max_attempts": literal(DELIVERY_ATTEMPTS),
        "scheduled_for": NOW,
        "created_at": NOW,
        # The job's trace: its delivery, published later, starts a trace linked to it.
        "trace_context": targets.c.trace_context,
    }
    inserted = (
        insert(Job)
        # Python-side column defaults are not evaluated inside a CTE: the server's apply.
        .from_select(list(columns), select(*columns.values()), include_defaults=False)
        .returning(Job.id, Job.state, Job.attempt)
        .cte("deliveries")
    )
    first_events = insert(JobEvent).from_select(
        ["job_id", "from_state", "to_state", "attempt"],
        select(inserted.c.id, null(), inserted.c.state, inserted.c.attempt),
        include_defaults=False,
    )
    return inserted, first_events.cte("delivery_events")


def claim_statement() -> TextualSelect:
    """Return the claim: a queued job starts if its queue is not paused and its limits admit it.

    One statement. It locks the job's limits in id order (so concurrent claims of jobs of
    one key serialise, and each sees the slots the other took), then either moves the job
    to `running` with its event and takes a slot in every limit (running count, and a
    start in the rate window), or, when a pause or a limit holds it back, sends it back to
    waiting for the dispatcher (`published_at` cleared, `waiting_for` set), spending no
    attempt. A limit admits a start while `running < max_running` and fewer than
    `capacity = max(1, floor(per_second))` starts fell in the last `capacity / per_second`
    seconds: bursts up to the rate, and never more than the rate over such a window.
    Rows come back with `from_state` (`queued` when claimed, NULL when sent back) and
    the claim's `event_id`; a claimed row carries its fresh `claim_token`.

    The statement's transaction commits without waiting for its WAL flush
    (`synchronous_commit = off`, set for this transaction only, inside the statement: a
    separate SET would cost the round trip it saves). Safe because a claim PostgreSQL
    loses in a crash leaves the job `queued` with its old token and attempt: every finish
    and heartbeat names the new token and moves nothing, the job's message or the
    reconciler runs it again, and no view of the lost claim was shown
    (`conveyor.ledger.transitions.PendingViews`). Submits and finishes stay durable.
    """
    t = TRANSITIONS[Move.CLAIM]
    (source,) = t.sources
    columns = ", ".join(f"jobs.{c.name}" for c in ROW)
    sql = f"""
    WITH job AS (
        SELECT id, tenant_id, type, queue, limit_key FROM jobs
        WHERE id = :p_id AND state = '{source}' AND (expires_at IS NULL OR expires_at > :p_now)
            AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off'
    ), gates AS (
        SELECT l.id, l.max_running, l.running, l.per_second, l.starts,
               GREATEST(1, floor(l.per_second))::int AS capacity,
               GREATEST(1, floor(l.per_second)) / l.per_second * interval '1 second' AS span
        FROM limits l JOIN job ON (l.tenant_id = job.tenant_id AND l.key = job.limit_key)
            OR (l.tenant_id IS NULL AND l.key = '{TYPE_LIMIT_PREFIX}' || job.type)
        ORDER BY l.id
        FOR UPDATE OF l
    ), held AS (
        SELECT CASE
            WHEN EXISTS (
                SELECT 1 FROM queue_pauses p, job
                WHERE p.queue = job.queue AND (p.tenant_id IS NULL OR p.tenant_id = job.tenant_id)
            ) THEN '{Waiting.PAUSE}'
            WHEN EXISTS (
                SELECT 1 FROM gates g
                WHERE (g.max_running IS NOT NULL AND g.running >= g.max_running)
                   OR (g.per_second IS NOT NULL AND (
                        SELECT count(*) FROM unnest(g.starts) AS s(t) WHERE s.t > :p_now - g.span
                   ) >= g.capacity)
            ) THEN '{Waiting.LIMIT}'
        END AS reason
    ), moved AS (
        UPDATE jobs SET state = '{t.target}', attempt = attempt + 1, started_at = :p_now,
            heartbeat_at = :p_now, worker = :p_worker, cancel_requested_at = NULL,
            claim_token = gen_random_uuid(),
            waiting_for = NULL, version = version + 1
        WHERE id IN (SELECT id FROM job) AND state = '{source}'
            AND (SELECT reason FROM held) IS NULL
        RETURNING {columns}, '{source}'::varchar AS from_state
    ), taken AS (
        UPDATE limits l SET running = l.running + 1, starts = CASE
            WHEN g.per_second IS NULL THEN l.starts
            ELSE ARRAY(
                SELECT s.t FROM unnest(l.starts) AS s(t) WHERE s.t > :p_now - g.span ORDER BY s.t
            ) || CAST(:p_now AS timestamptz)
        END
        FROM gates g WHERE l.id = g.id AND EXISTS (SELECT 1 FROM moved)
    ), sent_back AS (
        UPDATE jobs SET published_at = NULL, waiting_for = (SELECT reason FROM held),
            version = version + 1
        WHERE id IN (SELECT id FROM job) AND state = '{source}'
            AND (SELECT reason FROM held) IS NOT NULL
        RETURNING {columns}, NULL::varchar AS from_state
    ), event AS (
        INSERT INTO job_events (job_id, from_state, to_state, attempt, detail)
        SELECT id, from_state, '{t.target}', attempt, CAST(:p_detail AS jsonb) FROM moved
        RETURNING id, job_id
    )
    SELECT moved.*, event.id AS event_id FROM moved JOIN event ON event.job_id = moved.id
    UNION ALL
    SELECT sent_back.*, NULL::bigint AS event_id FROM sent_back
    """  # noqa: S608 - every name and value interpolated is the ledger's own constant
    typed = text(sql).bindparams(
        bindparam("p_now", type_=Job.started_at.type),
        bindparam("p_detail", type_=JobEvent.detail.type),
    )
    return typed.columns(
        *ROW, column("from_state", JobEvent.from_state.type), column("event_id", BigInteger())
    )
