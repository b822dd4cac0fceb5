"""dedup/quality: step 2 of the loop (see service.py)."""
