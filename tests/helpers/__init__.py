"""Plain helpers the tests share (functions and constants, no fixtures): the tiny model, tokenizer and
student (`models`), the real steps' inputs built for a test (`steps`), the Serve app's tokens and a finished
student (`serve`), and a free local port (`net`). Fixtures shared by modules live in the conftest files."""
