"""python -m bench: every Djinn benchmark, one entry point. See bench/README.md."""
