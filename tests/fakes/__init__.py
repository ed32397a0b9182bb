"""Fakes for tests and benchmarks: real servers on 127.0.0.1 that speak the wire formats distill-ray talks to."""
