"""verifier: step 5 of the loop (see service.py)."""
