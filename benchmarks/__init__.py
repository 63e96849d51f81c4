"""Speed measurements of ferjax (run as python -m benchmarks.NAME; see README.md here)."""
