"""Live job views in Redis: the status poll's fast path, with the ledger as its fallback."""
