"""converter: step 8 of the loop (see service.py)."""
