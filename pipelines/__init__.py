"""Prefect flows that chain the DVC stages; they orchestrate and hold no ML logic."""
