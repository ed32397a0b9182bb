"""Step 3b: filtering teacher outputs, each drop recorded with its reason."""
