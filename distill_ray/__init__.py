"""distill-ray: distil an OpenAI-compatible teacher LLM into a small student, every step a Ray job.

The package folders follow the pipeline: config (step 1's task and bar live in the config),
prompts (step 2), teacher and filters (step 3), train (steps 4-5), evaluate (step 6), serve
(step 7), plus the shared rooms: storage, manifest and the CLI.
"""

__version__ = "0.1.0"
