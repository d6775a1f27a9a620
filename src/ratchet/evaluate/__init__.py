"""Test-split metrics (torchmetrics, exact under DDP), classification report and plots."""


def summary_line(metrics: dict) -> str:
    """The headline test figures of metrics.json, for a log line."""
    if "rmse" in metrics:
        line = f"rmse {metrics['rmse']:.4g}, mae {metrics['mae']:.4g} (naive {metrics['naive_rmse']:.4g}"
        if "seasonal_naive_rmse" in metrics:
            line += f", seasonal naive {metrics['seasonal_naive_rmse']:.4g}"
        return line + f") on {metrics['windows']} test windows"
    return f"accuracy {metrics['accuracy']:.4f}, f1_macro {metrics['f1_macro']:.4f} on {metrics['samples']} test samples"
