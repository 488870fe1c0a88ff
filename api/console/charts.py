"""The overview's chart, drawn on the server as inline SVG: no script, no library, offline."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup

from conveyor.ledger.activity import Minute

WIDTH, HEIGHT, PAD = 720, 160, 24
# Markup.format escapes every argument: only these fixed shapes are trusted markup.
_BAR = Markup(
    "<g><title>{label}</title>"
    '<rect class="ok" x="{x:.1f}" y="{ok_y:.1f}" width="{w:.1f}" height="{ok_h:.1f}"/>'
    '<rect class="failed" x="{x:.1f}" y="{failed_y:.1f}" width="{w:.1f}" height="{failed_h:.1f}"/>'
    "</g>"
)
_AXIS = Markup(
    '<line class="axis" x1="{pad}" y1="{base}" x2="{width}" y2="{base}"/>'
    '<text x="{pad}" y="{label_y}">{first}</text>'
    '<text x="{width}" y="{label_y}" text-anchor="end">{last} UTC</text>'
    '<text x="0" y="12">{peak}</text><text x="0" y="{base}">0</text>'
)
_SVG = Markup(
    '<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{summary}" '
    'preserveAspectRatio="none">{axis}{bars}</svg>'
)


def finishes_chart(minutes: Sequence[Minute]) -> Markup:
    """Return stacked bars per minute (succeeded below, failed above) as an SVG element."""
    peak = max((m.succeeded + m.failed for m in minutes), default=0) or 1
    slot = (WIDTH - PAD) / max(len(minutes), 1)
    scale = (HEIGHT - PAD) / peak
    base = HEIGHT - PAD
    bars = Markup("").join(
        _BAR.format(
            label=f"{m.at:%H:%M} UTC: {m.succeeded} succeeded, {m.failed} failed",
            x=PAD + index * slot,
            w=slot * 0.8,
            ok_y=base - m.succeeded * scale,
            ok_h=m.succeeded * scale,
            failed_y=base - (m.succeeded + m.failed) * scale,
            failed_h=m.failed * scale,
        )
        for index, m in enumerate(minutes)
    )
    axis = _AXIS.format(
        pad=PAD,
        base=base,
        width=WIDTH,
        label_y=HEIGHT - 6,
        first=f"{minutes[0].at:%H:%M}" if minutes else "",
        last=f"{minutes[-1].at:%H:%M}" if minutes else "",
        peak=peak,
    )
    summary = (
        "Jobs finished per minute over the last hour: "
        f"{sum(m.succeeded for m in minutes)} succeeded, {sum(m.failed for m in minutes)} failed"
    )
    return _SVG.format(width=WIDTH, height=HEIGHT, summary=summary, axis=axis, bars=bars)
