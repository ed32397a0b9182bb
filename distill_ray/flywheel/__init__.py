"""The flywheel: distil again from the served traffic, reusing the teacher answers already paid for.

`served.py` turns the request logs into the next round's prompts (client traffic not seen in any
earlier prompt set, in the served mix), `answers.py` decides which logged teacher answers are the
answers generate would have paid for and puts them in the teacher cache, and `step.py` runs a
round (`distill-ray redistill`, the `redistill` step of `distill-ray run`).
"""
