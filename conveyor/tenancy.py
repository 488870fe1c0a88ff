"""The tenant's objects by id: the one place that answers "yours, or not found".

Another tenant's object is as absent as one that never existed: the same `NotFound`, so an
id tells a caller nothing about anyone else.
"""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.orm import Session

from conveyor.errors import NotFound

M = TypeVar("M")


def _yours(model: Any, object_id: uuid.UUID, tenant_id: uuid.UUID) -> list[ColumnElement[bool]]:
    return [model.id == object_id, model.tenant_id == tenant_id]


def owned(
    session: Session, model: type[M], object_id: uuid.UUID, tenant_id: uuid.UUID, what: str
) -> M:
    """Return the tenant's `model` row with this id, or raise `NotFound` naming `what`."""
    found = session.scalar(select(model).where(*_yours(model, object_id, tenant_id)))
    if found is None:
        raise NotFound(f"there is no {what} {object_id}")
    return found


def owned_row(
    session: Session,
    model: Any,
    columns: tuple[Any, ...],
    object_id: uuid.UUID,
    tenant_id: uuid.UUID,
    what: str,
) -> RowMapping:
    """Return the tenant's row with this id as `columns` by name, or raise `NotFound`."""
    row = (
        session.execute(select(*columns).where(*_yours(model, object_id, tenant_id)))
        .mappings()
        .one_or_none()
    )
    if row is None:
        raise NotFound(f"there is no {what} {object_id}")
    return row
