"""Entrypoints: thin absl scripts that parse flags and call ferjax (run as python -m)."""
