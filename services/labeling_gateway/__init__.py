"""labeling-gateway: step 4 of the loop (see service.py)."""
