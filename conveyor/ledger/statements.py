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
    ColumnElement,
    Select,
    String,
    and_,
    bindparam,
    cast,
    func,
    insert,
    literal,
    null,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

from conveyor.ledger.states import TRANSITIONS, JobState, Move
from conveyor.models import Job, JobEvent, Webhook
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
    sets: dict[str, Any] = {"state": t.target, "version": Job.version + 1, **(values or {})}
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
    return statement


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
