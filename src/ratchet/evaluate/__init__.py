"""Test-split metrics (torchmetrics, exact under DDP), classification report and plots."""
