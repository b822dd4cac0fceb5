"""trainer: step 6 of the loop (see service.py)."""
