"""Sliding windows over a time series as views (`Tensor.unfold`), never materialised copies.

`windows(series, target, input, horizon, stride)` gives the model inputs and the targets of
every window as two `Windows`: window i reads `series[i*stride : i*stride + input]` and
forecasts `target[i*stride + input : i*stride + input + horizon]`. Both are views of the one
series held in memory, so their size is O(series), not O(series x window); a batch is gathered
from the view with one `index_select` (the only copy, batch-sized). The loader treats them like
arrays: `len`, `nbytes`, `to(device)` (moves the series, not the windows), `index_select`.
"""

from __future__ import annotations

import numpy as np
import torch

from ratchet.data.sequence import window_count


class Windows:
    """Windows of `size` steps, `step` apart, starting at `start`: a view of shape
    (count, size) over a 1-D series, or (count, size, features) over a 2-D one."""

    def __init__(self, series: torch.Tensor, start: int, size: int, step: int, count: int):
        if count < 1 or start + (count - 1) * step + size > len(series):
            raise ValueError(f"{count} windows of {size} steps from {start} do not fit {len(series)} steps")
        self.series, self.start, self.size, self.step, self.count = series, start, size, step, count
        view = series[start : start + (count - 1) * step + size].unfold(0, size, step)  # (count, [F,] size)
        self.view = view if series.dim() == 1 else view.transpose(1, 2)  # (count, size, F)

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> torch.Size:
        return self.view.shape

    @property
    def nbytes(self) -> int:
        """Memory actually held: the series, not count x size."""
        return self.series.element_size() * self.series.nelement()

    def to(self, device: torch.device | str) -> Windows:
        return Windows(self.series.to(device), self.start, self.size, self.step, self.count)

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """The windows at `index`, copied into one contiguous batch."""
        assert dim == 0, "windows are selected along the first dimension"
        return self.view.index_select(0, index.to(self.series.device)).contiguous()

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = np.arange(self.count)[rows]
        return self.index_select(0, torch.as_tensor(np.asarray(rows), dtype=torch.long))


def windows(series: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, input: int, horizon: int,
            stride: int) -> tuple[Windows, Windows]:
    """(inputs, targets): the model reads `input` steps of `series` (T, F) and forecasts the
    next `horizon` steps of `target` (T,)."""
    series, target = torch.as_tensor(series), torch.as_tensor(target)
    count = window_count(len(series), input, horizon, stride)
    return Windows(series, 0, input, stride, count), Windows(target, input, horizon, stride, count)
