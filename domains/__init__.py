"""Business domains, each a plugin package found through the `conveyor.domains` entry points.

A domain imports `conveyor` (and third-party packages), never `api` or `worker`;
`docs/guides/domains.md` shows how to add one.
"""
