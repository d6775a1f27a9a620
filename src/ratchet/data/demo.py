"""Built-in demo datasets, written from data that installed packages ship (no network).

- breast_cancer.csv: scikit-learn's Wisconsin breast-cancer table (569 rows, 30 numeric
  features, label `diagnosis`: malignant / benign).
- digits/<digit>/<n>.png: scikit-learn's handwritten digits (1797 real 8x8 greyscale scans
  from UCI, 16 grey levels scaled to 0-255) as an ImageFolder tree, one folder per digit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_digits

from ratchet.data.prepared import replace_dir


def write_demo(out_dir: Path) -> list[Path]:
    """Write every demo dataset into `out_dir` (replaced as a whole); return what it holds."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    bunch = load_breast_cancer(as_frame=True)
    table = bunch.frame.drop(columns=["target"])
    table["diagnosis"] = [str(bunch.target_names[t]) for t in bunch.target]
    table.to_csv(tmp / "breast_cancer.csv", index=False, float_format="%.6g")
    write_digits(tmp / "digits")
    replace_dir(tmp, out_dir)
    return sorted(out_dir.iterdir())


def write_digits(root: Path) -> None:
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for n, (image, label) in enumerate(zip(pixels, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{n:04d}.png")
