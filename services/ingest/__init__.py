"""ingest: step 1 of the loop (see service.py)."""
