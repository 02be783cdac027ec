"""Evaluation: exact-match generation tasks, likelihood, and the lm-evaluation-harness adapter."""
