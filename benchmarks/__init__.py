"""Speed benchmarks (run from the repository root: `python -m benchmarks.model`)."""
