"""recognizer: step 3 of the loop. The library's model for each image says whether it recognises it."""
