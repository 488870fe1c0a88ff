"""The broker: Celery's configuration, publishing, looking into queues, and its internals."""
