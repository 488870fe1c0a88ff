"""How deep JSON may nest: one limit for request bodies and job results alike.

Python's `json`, pydantic's serializer (at ~255 levels), psycopg's JSON dumps and
traceback rendering all recurse, so a document a few hundred levels deep turns into a
RecursionError, a 500 or a worker stuck rendering locals, far from where it came in.
Refusing it at the edge, by a walk that does not recurse, keeps it out of all of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Levels of objects and arrays below the document itself. Hand-written and generated
# documents stay far shallower (GeoJSON ~6, JSON Schema and OpenAPI documents, nested
# query DSLs a few dozen at most); it is a quarter of pydantic's serializer limit.
MAX_JSON_DEPTH = 64
# A path past the limit has more than MAX_JSON_DEPTH parts: shown are the first few,
# enough to say which field of the body it is in, each key cut to a readable length.
_SHOWN_PARTS = 8
_SHOWN_KEY = 40


def _children(value: dict[str, Any] | list[Any]) -> Iterator[tuple[str | int, Any]]:
    return iter(value.items()) if isinstance(value, dict) else enumerate(value)


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> list[str | int] | None:
    """Return the path to the first object or array nested deeper than `limit`, or None.

    `value` itself is level 0; its members' objects and arrays are level 1, and so on.
    """
    if not isinstance(value, dict | list):
        return None
    # Depth first, one iterator per open container: the path is the keys being visited,
    # and a scalar costs one isinstance check.
    stack = [_children(value)]
    path: list[str | int] = []
    while stack:
        for key, child in stack[-1]:
            if isinstance(child, dict | list):
                if len(stack) > limit:
                    return [*path, key]
                path.append(key)
                stack.append(_children(child))
                break
        else:
            stack.pop()
            if path:
                path.pop()
    return None


def render_path(path: list[str | int], root: str = "") -> str:
    """Write a path as a field name (`jobs[0].metadata.x`), shortened when long."""
    text = root
    for part in path[:_SHOWN_PARTS]:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if len(part) <= _SHOWN_KEY else part[:_SHOWN_KEY] + "…"
            text += f".{name}" if text else name
    return text + ("…" if len(path) > _SHOWN_PARTS else "")
