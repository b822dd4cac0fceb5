"""distributor: step 10 of the loop (see service.py)."""
