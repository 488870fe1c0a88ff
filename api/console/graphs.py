"""A workflow's graph, drawn on the server as inline SVG: jobs in columns by dependency depth.

Each job is a box in the column of its longest chain of dependencies (roots on the left),
coloured by its state and linking to its job page; each `depends_on` is an edge from the
parent's right side to the child's left. No script and no layout library: the page stays
readable offline and with scripts off. Past `MAX_DRAWN` jobs the page shows a table instead.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

# Beyond this many jobs a drawing is too large to read (and to send): a table serves better.
MAX_DRAWN = 300
BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 150, 40, 56, 12, 8
LABEL_CHARS = 20
# Markup.format escapes every argument: only these fixed shapes are trusted markup.
_BOX = Markup(
    '<a href="{href}" class="node state-{state}"><title>{title}</title>'
    '<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="4"/>'
    '<text x="{tx}" y="{ty1}">{label}</text><text class="sub" x="{tx}" y="{ty2}">{state}</text></a>'
)
_EDGE = Markup(
    '<path class="edge" d="M{x1} {y1} C{cx1} {y1} {cx2} {y2} {x2} {y2}" marker-end="url(#arrow)"/>'
)
_SVG = Markup(
    '<svg class="graph" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
    'role="img" aria-label="{summary}"><defs><marker id="arrow" viewBox="0 0 8 8" refX="8" '
    'refY="4" markerWidth="6" markerHeight="6" orient="auto"><path d="M0 0 L8 4 L0 8 z"/>'
    "</marker></defs>{edges}{boxes}</svg>"
)


@dataclass(frozen=True)
class Placed:
    """A job's place in the drawing: its column (depth) and row."""

    column: int
    row: int


def _key(job: dict[str, Any]) -> str:
    # `depends_on` names a parent by its ref, or by its id when it has none.
    return str(job.get("ref") or job["id"])


def depths(jobs: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Return each job's depth: 0 for a job without parents, else 1 + its deepest parent's."""
    keys = {_key(job) for job in jobs}
    parents = {_key(job): [p for p in job["depends_on"] if p in keys] for job in jobs}
    children: dict[str, list[str]] = defaultdict(list)
    for child, ps in parents.items():
        for parent in ps:
            children[parent].append(child)
    waiting = {key: len(ps) for key, ps in parents.items()}
    depth = dict.fromkeys(keys, 0)
    # Kahn's order, iteratively: a chain of 1,000 jobs must not hit the recursion limit.
    ready = deque(key for key, n in waiting.items() if n == 0)
    while ready:
        key = ready.popleft()
        for child in children[key]:
            depth[child] = max(depth[child], depth[key] + 1)
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    return depth


def layout(jobs: Sequence[dict[str, Any]]) -> dict[str, Placed]:
    """Place each job: its column is its depth, its row its order among that column's jobs."""
    depth = depths(jobs)
    rows: dict[int, int] = defaultdict(int)
    placed = {}
    for job in jobs:
        key = _key(job)
        column = depth[key]
        placed[key] = Placed(column, rows[column])
        rows[column] += 1
    return placed


def _label(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def workflow_graph(jobs: Sequence[dict[str, Any]], href: Callable[[str], str]) -> Markup | None:
    """Return the workflow's jobs and edges as an SVG element, or None when too many to draw.

    `href(job_id)` gives the link of a job's box.
    """
    if not jobs or len(jobs) > MAX_DRAWN:
        return None
    placed = layout(jobs)

    def corner(place: Placed) -> tuple[int, int]:
        return PAD + place.column * (BOX_W + GAP_X), PAD + place.row * (BOX_H + GAP_Y)

    boxes = []
    edges = []
    for job in jobs:
        key = _key(job)
        x, y = corner(placed[key])
        label = _label(key if job.get("ref") else job["type"])
        boxes.append(
            _BOX.format(
                href=href(str(job["id"])),
                state=job["state"],
                title=f"{key} ({job['type']}): {job['state']}",
                x=x,
                y=y,
                w=BOX_W,
                h=BOX_H,
                tx=x + 8,
                ty1=y + 16,
                ty2=y + 32,
                label=label,
            )
        )
        for parent in job["depends_on"]:
            if parent not in placed:
                continue  # a parent outside the workflow (not drawn)
            px, py = corner(placed[parent])
            x1, y1, x2, y2 = px + BOX_W, py + BOX_H // 2, x, y + BOX_H // 2
            middle = (x1 + x2) // 2
            edges.append(_EDGE.format(x1=x1, y1=y1, x2=x2, y2=y2, cx1=middle, cx2=middle))
    columns = max(p.column for p in placed.values()) + 1
    rows = max(p.row for p in placed.values()) + 1
    summary = (
        f"The workflow's {len(jobs)} jobs in {columns} levels of dependencies, "
        f"{len(edges)} edges; each box links to its job"
    )
    return _SVG.format(
        width=2 * PAD + columns * BOX_W + (columns - 1) * GAP_X,
        height=2 * PAD + rows * BOX_H + (rows - 1) * GAP_Y,
        summary=summary,
        edges=Markup("").join(edges),
        boxes=Markup("").join(boxes),
    )
