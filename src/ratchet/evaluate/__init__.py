"""Evaluation building blocks: torchmetrics collections, the classification report, forecast
errors beside naive baselines, and plots. Each family's `evaluate` hook puts them together."""
