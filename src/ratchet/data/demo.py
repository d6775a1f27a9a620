"""Built-in demo datasets, written from data that installed packages ship (no network).

- breast_cancer.csv: scikit-learn's Wisconsin breast-cancer table (569 rows, 30 numeric
  features, label `diagnosis`: malignant / benign).
- digits/<digit>/<n>.png: scikit-learn's handwritten digits (1797 real 8x8 greyscale scans
  from UCI, 16 grey levels scaled to 0-255) as an ImageFolder tree, one folder per digit.
- omniglot/<alphabet>/<character>/<drawing>.png: 799 real Omniglot drawings (4 alphabets x 10
  characters, 19-20 each), vendored in omniglot_demo.zip beside this module with their MIT
  licence and provenance (OMNIGLOT.md): no installed package ships Omniglot.
- load.csv: a **synthetic** hourly electricity-load series (120 days, columns `timestamp`,
  `load`, `temperature`), generated with a fixed seed: a daily profile with morning and evening
  peaks, lower weekends, a response to temperature and autocorrelated noise. No installed
  package ships a real series that suits forecasting demos: the ones there are (matplotlib's
  sample stock prices) are short random walks, which the naive last-value forecast already
  predicts as well as any model can.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_digits

from ratchet.data.prepared import OUTPUT_MARKER, check_replaceable, replace_dir


def write_demo(out_dir: Path) -> list[Path]:
    """Write every demo dataset into `out_dir` (replaced as a whole); return what it holds."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        bunch = load_breast_cancer(as_frame=True)
        table = bunch.frame.drop(columns=["target"])
        table["diagnosis"] = [str(bunch.target_names[t]) for t in bunch.target]
        table.to_csv(tmp / "breast_cancer.csv", index=False, float_format="%.6g")
        write_digits(tmp / "digits")
        write_load_series(tmp / "load.csv")
        write_omniglot(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p for p in out_dir.iterdir() if p.name != OUTPUT_MARKER)


def write_digits(root: Path) -> None:
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for n, (image, label) in enumerate(zip(pixels, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{n:04d}.png")


OMNIGLOT_ZIP = Path(__file__).with_name("omniglot_demo.zip")


def write_omniglot(out_dir: Path) -> None:
    """Unpack the vendored Omniglot subset as `out_dir/omniglot/<alphabet>/<character>/*.png`."""
    with zipfile.ZipFile(OMNIGLOT_ZIP) as archive:
        for name in archive.namelist():
            if not name.startswith("omniglot/") or ".." in Path(name).parts:
                raise ValueError(f"{OMNIGLOT_ZIP}: unexpected member {name}")
        archive.extractall(out_dir)


def write_load_series(path: Path, days: int = 120, seed: int = 7) -> None:
    """The synthetic hourly load series described in the module doc."""
    rng = np.random.default_rng(seed)
    hours = days * 24
    t = np.arange(hours)
    hour, day = t % 24, t // 24
    weekend = (day + 0) % 7 >= 5  # 2024-01-01 is a Monday
    temperature = (8 + 6 * np.sin(2 * np.pi * (day - 20) / 365) + 4 * np.sin(2 * np.pi * (hour - 9) / 24)
                   + np.cumsum(rng.normal(0, 0.3, hours)) * 0.2)
    profile = 20 * np.exp(-((hour - 8) ** 2) / 6) + 28 * np.exp(-((hour - 19) ** 2) / 8) - 8 * ((hour < 5) | (hour > 22))
    noise = np.zeros(hours)
    for i in range(1, hours):  # AR(1): errors persist for a few hours
        noise[i] = 0.8 * noise[i - 1] + rng.normal(0, 2.0)
    load = (100 + np.where(weekend, 0.75, 1.0) * profile - 1.5 * (temperature - 8) + noise).round(2)
    stamps = pd.date_range("2024-01-01", periods=hours, freq="h").strftime("%Y-%m-%d %H:%M:%S")
    pd.DataFrame({"timestamp": stamps, "load": load, "temperature": temperature.round(2)}).to_csv(path, index=False)
