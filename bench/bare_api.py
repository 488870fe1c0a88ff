"""The baseline API: the least a Flask app can do to queue a job (INSERT ... RETURNING + send_task).

No auth, no validation, no events, no idempotency: it is the floor Conveyor is compared to.
Like Conveyor it uses a pooled engine and a publishing Celery app without a result backend.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, abort, jsonify, request
from sqlalchemy import create_engine, text

from conveyor.broker.config import create_celery
from conveyor.settings import Settings

QUEUE = "bare"


def create_app() -> Flask:
    """Build the baseline app from `BARE_DATABASE_URL` and the usual `CONVEYOR_REDIS_URL`."""
    settings = Settings(database_url=os.environ["BARE_DATABASE_URL"])
    engine = create_engine(settings.sqlalchemy_url, pool_size=10, max_overflow=10)
    celery = create_celery(settings, name="bare-api")
    app = Flask(__name__)

    @app.post("/jobs")
    def submit() -> Any:
        body = request.get_json()
        with engine.begin() as conn:
            job_id = conn.execute(
                text("INSERT INTO bare_jobs (payload) VALUES (CAST(:p AS jsonb)) RETURNING id"),
                {"p": app.json.dumps(body)},
            ).scalar_one()
        celery.send_task("bare.run", args=[job_id], queue=QUEUE)
        return jsonify(id=job_id, state="queued"), 202

    @app.post("/jobs/batch")
    def submit_batch() -> Any:
        jobs = request.get_json()["jobs"]
        with engine.begin() as conn:
            ids = (
                conn.execute(
                    text(
                        "INSERT INTO bare_jobs (payload) "
                        "SELECT * FROM unnest(CAST(:p AS jsonb[])) RETURNING id"
                    ),
                    {"p": [app.json.dumps(job) for job in jobs]},
                )
                .scalars()
                .all()
            )
        with celery.producer_or_acquire() as producer:
            for job_id in ids:
                celery.send_task("bare.run", args=[job_id], queue=QUEUE, producer=producer)
        return jsonify(items=[{"id": i, "state": "queued"} for i in ids]), 202

    @app.get("/jobs/<int:job_id>")
    def show(job_id: int) -> Any:
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT id, state, payload FROM bare_jobs WHERE id = :id"), {"id": job_id}
            ).one_or_none()
        if row is None:
            abort(404)
        return jsonify(id=row.id, state=row.state, payload=row.payload)

    return app
