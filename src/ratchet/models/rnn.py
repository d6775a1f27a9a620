"""Recurrent forecasters: an RNN, LSTM or GRU over the input window, then a linear head from
the last hidden state to every step of the horizon (the course's forecasting nets, stacked and
optionally bidirectional)."""

from __future__ import annotations

import torch
from torch import nn

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class Forecaster(nn.Module):
    """(N, input steps, features) -> (N, horizon)."""

    def __init__(self, features: int, horizon: int, cfg):
        super().__init__()
        self.rnn = CELLS[cfg.name](
            input_size=features, hidden_size=cfg.hidden, num_layers=cfg.layers, batch_first=True,
            dropout=cfg.dropout if cfg.layers > 1 else 0.0, bidirectional=cfg.bidirectional,
        )
        self.directions = 2 if cfg.bidirectional else 1
        self.head = nn.Linear(cfg.hidden * self.directions, horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c)
        last = h[-self.directions :]  # the last layer, each direction: (directions, N, hidden)
        return self.head(torch.cat(list(last), dim=1))
