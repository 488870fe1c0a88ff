"""A generated orders CSV for the benchmark's import phase: valid rows, streamed in chunks."""

from __future__ import annotations

from collections.abc import Iterator

HEADER = b"order_id,customer_email,amount,currency,ordered_at\n"


def rows(count: int) -> Iterator[bytes]:
    """Yield a CSV with `count` valid order rows, in ~1 MiB chunks."""
    buffer = [HEADER]
    size = 0
    for n in range(count):
        amount = f"{n % 997}.{n % 100:02d}"
        line = f"O-{n},c{n % 5000}@example.com,{amount},EUR,2026-03-{1 + n % 28:02d}T10:00:00Z\n"
        buffer.append(line.encode())
        size += len(line)
        if size >= 1024 * 1024:
            yield b"".join(buffer)
            buffer, size = [], 0
    yield b"".join(buffer)
