"""Step 3: teacher outputs."""
