"""Evaluation: tasks (M3-Bench, LoCoMo, synthetic), metrics, the judge, the runner and reports."""
