"""Step 2: the prompt set from production logs."""
