"""Import torchmetrics' classification and regression metrics without its other domains.

`import torchmetrics` runs a package `__init__` that imports every domain it ships (audio pulls
scipy.signal, image pulls torchvision, whose detection ops import torch._dynamo): about 3.5 s of
a stage's start-up on 2 cores for metrics no stage uses. `defer_torchmetrics()` registers the
two package modules `torchmetrics` and `torchmetrics.functional` unexecuted, so importing a
submodule (`torchmetrics.classification`, `torchmetrics.collections`) loads that submodule and
what it imports, nothing else. The first attribute asked of either package that it does not
hold yet (`torchmetrics.Accuracy`, `from torchmetrics import MetricCollection`,
`torchmetrics.functional.accuracy`) runs the package's own `__init__` in place, so code that
uses the top-level API still gets all of it, only later.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from types import ModuleType

PACKAGES = ("torchmetrics", "torchmetrics.functional")


def defer_torchmetrics() -> None:
    """Register torchmetrics' package modules to run their `__init__` on first use; a no-op once
    torchmetrics is imported (or deferred), or when it is not installed."""
    if "torchmetrics" in sys.modules or importlib.util.find_spec("torchmetrics") is None:
        return
    root = _deferred("torchmetrics")
    # What the package's __init__ defines before its imports, and which submodules import
    # from it (torchmetrics.utilities.prints: `from torchmetrics import _logger`).
    about = importlib.import_module("torchmetrics.__about__")
    root.__dict__.update({k: v for k, v in vars(about).items() if k.startswith("__") and k.endswith("__")
                          and k not in ("__name__", "__file__", "__spec__", "__loader__", "__package__",
                                        "__path__", "__doc__", "__builtins__", "__cached__")})
    root._logger = logging.getLogger("torchmetrics")
    root._PACKAGE_ROOT = os.path.dirname(root.__file__)
    root._PROJECT_ROOT = os.path.dirname(root._PACKAGE_ROOT)
    _deferred("torchmetrics.functional")
    # torchmetrics.metric and torchmetrics.utilities import each other; the package __init__
    # imports utilities first, and so must this.
    importlib.import_module("torchmetrics.utilities")


def _deferred(name: str) -> ModuleType:
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)

    def __getattr__(attr: str):  # noqa: N807 (PEP 562)
        if module.__dict__.pop("__getattr__", None) is None:  # another thread or a nested lookup
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        spec.loader.exec_module(module)
        return getattr(module, attr)

    module.__getattr__ = __getattr__
    sys.modules[name] = module
    if "." in name:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)
    return module
