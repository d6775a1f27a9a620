"""Built-in demo datasets, written from data that installed packages ship (no network).

- breast_cancer.csv: scikit-learn's Wisconsin breast-cancer table (569 rows, 30 numeric
  features, label `diagnosis`: malignant / benign).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from sklearn.datasets import load_breast_cancer

from ratchet.data.prepared import replace_dir


def write_demo(out_dir: Path) -> list[Path]:
    """Write every demo dataset into `out_dir` (replaced as a whole); return the files."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    bunch = load_breast_cancer(as_frame=True)
    table = bunch.frame.drop(columns=["target"])
    table["diagnosis"] = [str(bunch.target_names[t]) for t in bunch.target]
    table.to_csv(tmp / "breast_cancer.csv", index=False, float_format="%.6g")
    replace_dir(tmp, out_dir)
    return sorted(out_dir.iterdir())
