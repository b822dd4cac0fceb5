"""evaluator: step 7 of the loop (see service.py)."""
