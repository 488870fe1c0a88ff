"""The job ledger: the one writer of `jobs` and `job_events` (DESIGN.md, "The ledger").

- `states`: the state machine as data, manual moves included;
- `statements`: the one guarded statement each move is, derived from that table;
- `transitions`: a job's moves (claim, finish, cancel, retry), `upkeep`: housekeeping's
  batches (promote, expire, reap, prune), `submit`: the insert, `publishing`: the outbox;
- `work`: the unit of work every write happens in, which writes the live views and
  publishes the queued jobs after its commit;
- `reads` and `views`: the tenant's jobs as clients see them.
"""
