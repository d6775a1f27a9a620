"""Per-family data preparation; every family writes the same prepared-data contract."""

from __future__ import annotations

from collections.abc import Callable

from ratchet.data import image, tabular

# family -> prepare(pipeline config) -> meta dict
PREPARERS: dict[str, Callable[..., dict]] = {"tabular": tabular.prepare, "image": image.prepare}
