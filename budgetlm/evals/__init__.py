"""Evaluation suites, the resumable runner, metrics and reports (planned)."""
