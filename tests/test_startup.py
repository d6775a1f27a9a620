"""Start-up: a stage imports the torchmetrics metrics it uses, not the package's other domains
(scipy.signal for audio, torchvision for image, ~3.5 s on 2 cores), and the metrics it computes
are those of the fully imported package. Each check runs in a fresh interpreter, since the
test process itself has imported torchmetrics whole."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import PATIENCE

SCORE = """
import json, sys, torch
torch.manual_seed(0)
preds, target = torch.rand(200, 4).softmax(1), torch.randint(0, 4, (200,))
{imports}
from ratchet.evaluate.metrics import test_metrics
collection = test_metrics(4, torch.device("cpu"))
collection.update(preds, target)
scores = {{k: v.tolist() for k, v in collection.compute().items()}}
loaded = sorted(m for m in ("torchvision", "scipy.signal", "torchmetrics.audio", "torchmetrics.image")
                if m in sys.modules)
{after}
print(json.dumps({{"scores": scores, "loaded": loaded, "after": after}}))
"""


def fresh(imports: str = "", after: str = "after = None") -> dict:
    code = SCORE.format(imports=imports, after=after)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=PATIENCE)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_stage_metrics_load_without_torchmetrics_other_domains_and_match_the_full_package():
    deferred = fresh(after="import torchmetrics\n"
                           "after = [torchmetrics.Accuracy.__name__, torchmetrics.functional.accuracy.__name__,\n"
                           "         'torchmetrics.image' in sys.modules]")
    assert deferred["loaded"] == []
    full = fresh(imports="import torchmetrics")  # torchmetrics whole, before the stage's import
    assert full["loaded"]  # the check above sees the domains when they are there
    assert deferred["scores"] == full["scores"]
    assert {"accuracy", "f1_macro", "f1_per_class", "confusion_matrix"} <= set(deferred["scores"])
    # The top-level API still works once asked for: it runs the package's own __init__.
    assert deferred["after"] == ["Accuracy", "accuracy", True]


def test_the_trainer_imports_no_torchmetrics_domain_it_does_not_use():
    code = ("import sys\nimport ratchet.train.trainer\n"
            "print([m for m in ('torchvision', 'scipy.signal') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=PATIENCE)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_cli_skips_the_collection_at_exit_after_every_other_exit_handler(tmp_path):
    """Python's last garbage collection over the objects torch's and MLflow's imports made took
    ~1 s of each short stage; the CLI freezes them instead (gc.freeze), once every exit handler
    registered after it started (MLflow's, ending runs) has run with collection still on."""
    from conftest import tiny_params, write_params

    params = write_params(tmp_path, tiny_params())
    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('last', gc.get_freeze_count() > 0))\n"  # runs last (LIFO)
            "import torch\nfrom ratchet.cli import main\n"
            f"main(['pipelines', '--params', {str(params)!r}])\n"
            "atexit.register(lambda: print('later', gc.get_freeze_count() > 0))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=PATIENCE)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-2:] == ["later False", "last True"]
