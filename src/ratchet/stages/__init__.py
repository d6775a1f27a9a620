"""Thin entry points that dvc.yaml and the Prefect flow call: `ratchet <stage> <pipeline>`."""
