"""The Celery side: the app factory, the task runner and the housekeeping tasks."""
