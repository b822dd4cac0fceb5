"""packager: step 9 of the loop (see service.py)."""
