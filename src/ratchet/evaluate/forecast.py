"""Forecast errors in the target's original units, beside naive baselines.

For every test window the model's forecast is unscaled and compared with the actual values;
the same windows are forecast by two baselines that need no training: *naive* (the last value
of the window, repeated over the horizon) and *seasonal naive* (the value one season earlier,
with `evaluate.seasonal_period` steps per season). A model worth deploying beats both.

Errors are summed in float64 per horizon step on each process and summed over processes, so
under DDP (each window on exactly one process) the result equals one process's.
"""

from __future__ import annotations

import math

import torch

BASELINES = ("naive", "seasonal_naive")


class ForecastErrors:
    """Running sums of squared and absolute errors per horizon step, for the model and baselines."""

    def __init__(self, horizon: int, target_index: int, offset: float, scale: float, period: int | None,
                 device: torch.device):
        self.horizon, self.t, self.offset, self.scale, self.period = horizon, target_index, offset, scale, period
        self.names = ["model", "naive"] + (["seasonal_naive"] if period else [])
        # per name: [squared errors per step, absolute errors per step]; then the window count
        self.sums = torch.zeros(len(self.names), 2, horizon, dtype=torch.float64, device=device)
        self.count = torch.zeros(1, dtype=torch.float64, device=device)

    def forecasts(self, output: torch.Tensor, window_raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model (unscaled) and baseline forecasts (N, horizon), float64, original units."""
        history = window_raw[..., self.t].double()  # (N, input steps)
        out = {"model": output.double() * self.scale + self.offset,
               "naive": history[:, -1:].expand(-1, self.horizon)}
        if self.period:
            steps = history.shape[1] - self.period + torch.arange(self.horizon, device=history.device) % self.period
            out["seasonal_naive"] = history[:, steps]
        return out

    def update(self, forecasts: dict[str, torch.Tensor], actual: torch.Tensor) -> None:
        actual = actual.double()
        for i, name in enumerate(self.names):
            error = forecasts[name] - actual
            self.sums[i, 0] += (error**2).sum(dim=0)
            self.sums[i, 1] += error.abs().sum(dim=0)
        self.count += len(actual)

    def compute(self) -> dict:
        """metrics.json's content: mse/mae/rmse of the model and each baseline, skill scores
        (1 - model MSE / baseline MSE: above 0 means the model is better), errors per step."""
        n = float(self.count.item())
        out: dict = {}
        for i, name in enumerate(self.names):
            mse = float(self.sums[i, 0].sum() / (n * self.horizon))
            mae = float(self.sums[i, 1].sum() / (n * self.horizon))
            prefix = "" if name == "model" else f"{name}_"
            out.update({f"{prefix}mse": mse, f"{prefix}mae": mae, f"{prefix}rmse": math.sqrt(mse)})
        for name in self.names[1:]:
            base = out[f"{name}_mse"]
            out[f"skill_vs_{name}"] = 1 - out["mse"] / base if base > 0 else 0.0
        out["windows"] = int(n)
        out["per_step"] = [
            {"step": h + 1, "mse": float(self.sums[0, 0, h] / n), "mae": float(self.sums[0, 1, h] / n),
             **{f"{name}_mse": float(self.sums[i, 0, h] / n) for i, name in enumerate(self.names) if i}}
            for h in range(self.horizon)
        ]
        return out


def report_text(metrics: dict, target: str) -> str:
    """Errors of the model and the baselines as a fixed-width table, then the skill scores."""
    rows = [("model", "")] + [(name, f"{name}_") for name in BASELINES if f"{name}_mse" in metrics]
    lines = [f"test forecast errors for {target} in original units over {metrics['windows']} windows", "",
             f"{'':>16}{'mse':>14}{'mae':>14}{'rmse':>14}"]
    for label, prefix in rows:
        lines.append(f"{label:>16}" + "".join(f"{metrics[prefix + m]:>14.6g}" for m in ("mse", "mae", "rmse")))
    lines.append("")
    for label, _ in rows[1:]:
        skill = metrics[f"skill_vs_{label}"]
        verdict = "beats" if skill > 0 else "does not beat"
        lines.append(f"the model {verdict} {label.replace('_', ' ')}: skill {skill:+.4f} (1 - MSE ratio)")
    if len(metrics["per_step"]) > 1:
        lines += ["", f"{'step':>16}{'mse':>14}{'mae':>14}"]
        lines += [f"{row['step']:>16}{row['mse']:>14.6g}{row['mae']:>14.6g}" for row in metrics["per_step"]]
    return "\n".join(lines) + "\n"
