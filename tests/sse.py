"""Reading server-sent event streams in tests: frames one at a time, with a timeout."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from conveyor.ledger.transitions import claim, succeed
from conveyor.ledger.upkeep import beat_heartbeats
from conveyor.ledger.work import Work
from conveyor.live.store import LiveStore, progress_document

TIMEOUT = 10.0


class Frames:
    """The frames of one open stream, read by a thread, taken one at a time with a timeout."""

    def __init__(self, response: Any) -> None:
        self.response = response
        self._frames: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buffer = ""
        try:
            for chunk in self.response.response:
                buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    self._frames.put(parse(block))
                if self._stop.is_set():
                    break
        finally:
            self._frames.put(None)  # the stream ended
            # Closed by the thread that iterates it (a generator cannot be closed from
            # another thread while it runs): the stream's subscription ends with it.
            self.response.close()

    def next(self, *, skip_pings: bool = True) -> dict[str, Any] | None:
        """Return the next frame (None when the stream ended); fail after TIMEOUT."""
        while True:
            frame = self._frames.get(timeout=TIMEOUT)
            if frame is not None and skip_pings and ("ping" in frame or "retry" in frame):
                continue
            return frame

    def assert_quiet(self, seconds: float) -> None:
        """Fail if anything but a heartbeat (or the opening `retry:`) arrives within `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = self._frames.get(timeout=left)
            except queue.Empty:
                return
            assert frame is not None
            assert "ping" in frame or "retry" in frame, frame

    def close(self) -> None:
        """Leave the stream, as a client that disconnects (noticed at the next heartbeat)."""
        self._stop.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()


def parse(block: str) -> dict[str, Any]:
    frame: dict[str, Any] = {}
    for line in block.splitlines():
        if line.startswith(":"):
            frame["ping"] = True
            continue
        name, _, value = line.partition(": ")
        frame[name] = json.loads(value) if name == "data" else value
    return frame


@contextlib.contextmanager
def opened(client: Any, url: str, headers: dict[str, str]) -> Iterator[Frames]:
    response = client.get(url, headers=headers, buffered=False)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/event-stream"
    assert response.headers["X-Accel-Buffering"] == "no"
    frames = Frames(response)
    try:
        yield frames
    finally:
        frames.close()


def run_to_success(work: Work, job_id: str, store: LiveStore | None = None) -> None:
    with work.single_statement() as unit:
        claimed = claim(unit, uuid.UUID(job_id), "w1", datetime.now(UTC))
    assert claimed is not None
    if store is not None:
        # As the worker's progress reporter does: a heartbeat first shows the claim.
        with work.single_statement() as unit:
            beat_heartbeats(unit, [claimed], datetime.now(UTC))
        store.set_progress(uuid.UUID(job_id), progress_document(5, 10, "half"))
    with work.begin() as unit:
        assert succeed(unit, claimed, {"ok": True}, datetime.now(UTC))
