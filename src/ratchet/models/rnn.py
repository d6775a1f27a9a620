"""Recurrent forecasters: an RNN, LSTM or GRU over the input window, then a linear head from
the last hidden state to every step of the horizon (the course's forecasting nets, stacked and
optionally bidirectional). With `residual`, the head forecasts the change from the window's last
target value, so an untrained network is already the naive (last-value) forecast."""

from __future__ import annotations

import torch
from torch import nn

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class Forecaster(nn.Module):
    """(N, input steps, features) -> (N, horizon)."""

    def __init__(self, features: int, horizon: int, cfg, target_index: int = 0):
        super().__init__()
        if not 0 <= target_index < features:
            raise ValueError(f"target_index {target_index} is not one of the {features} input columns")
        self.rnn = CELLS[cfg.name](
            input_size=features, hidden_size=cfg.hidden, num_layers=cfg.layers, batch_first=True,
            dropout=cfg.dropout if cfg.layers > 1 else 0.0, bidirectional=cfg.bidirectional,
        )
        self.directions = 2 if cfg.bidirectional else 1
        self.head = nn.Linear(cfg.hidden * self.directions, horizon)
        self.residual = bool(getattr(cfg, "residual", False))
        if self.residual:  # start exactly at the naive forecast: no change predicted
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.target_index = target_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c)
        last = h[-self.directions :]  # the last layer, each direction: (directions, N, hidden)
        out = self.head(torch.cat(list(last), dim=1))
        if self.residual:  # every horizon step is a change from the last observed target value
            out = out + x[:, -1, self.target_index : self.target_index + 1]
        return out
