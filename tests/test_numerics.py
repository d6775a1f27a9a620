"""numerics.mode: portable gives bitwise the same weights on two different machines; fast does not.

Two machines are simulated on this one by what a CPU changes in torch: the kernel set oneDNN,
MKL and ATen pick (capped from outside with their own environment variables, as an AVX2-only
CPU would have them) and the core count (OMP_NUM_THREADS). Each training is its own process,
since those libraries read their settings once, when torch starts.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_image_tree, ratchet, tiny_image_section, write_params

# What another machine changes beyond the caps portable sets: oneDNN there picks other kernels
# within the same ISA (its blocking follows the CPU's caches), simulated by oneDNN's own cap
# set after pin() (oneDNN reads it when it makes its first kernel); and the simulated machine is
# not an Intel CPU, where MKL honours no branch but AUTO and COMPATIBLE (MKL_CBWR=AVX2 runs its
# AUTO branch there, as it did on an AMD EPYC). Only the probe script below reads PIN_THEN and
# NOT_INTEL; the end-to-end test's stages ignore them.
OTHER_KERNELS = {"PIN_THEN": '{"ONEDNN_MAX_CPU_ISA": "SSE41"}', "NOT_INTEL": "1"}
AVX2_CPU = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1",
            **OTHER_KERNELS}
CAPS = (*AVX2_CPU, "MKL_NUM_THREADS")
# mkl_cbwr_get(MKL_CBWR_BRANCH)'s answers (MKL's named constants): AUTO 2, COMPATIBLE 3, AVX2 10.
MKL_BRANCH = """
import ctypes, os, sys
from ratchet.config import NumericsConfig
from ratchet.numerics import pin
pin(NumericsConfig(mode="portable"))
import torch
torch.ones(8, 8) @ torch.ones(8, 8)  # MKL reads MKL_CBWR at its first call
mkl = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
print(mkl.mkl_serv_cbwr_get(1))
"""


def machine(caps: dict) -> dict:
    """This process's environment as a machine with `caps` would have it (none: this CPU)."""
    env = {k: v for k, v in os.environ.items() if k not in CAPS}
    return {**env, **caps}


# 20 steps of a LeNet-like CNN (oneDNN convolutions under fast), an LSTM and a linear head (MKL GEMMs) with
# BatchNorm and Adam (ATen reductions): every kernel family the model families use.
TRAIN = """
import hashlib, json, os, sys
from ratchet.config import NumericsConfig
from ratchet.numerics import pin
pin(NumericsConfig(mode=sys.argv[1]))
os.environ.update(json.loads(os.environ.get("PIN_THEN", "{}")))
if os.environ.get("NOT_INTEL") and not os.environ.get("MKL_CBWR", "AUTO").startswith(("AUTO", "COMPATIBLE")):
    options = os.environ["MKL_CBWR"].partition(",")[2]  # STRICT, if asked for, still holds there
    os.environ["MKL_CBWR"] = f"AUTO,{options}" if options else "AUTO"  # MKL reads it at its first call
import torch
from torch import nn
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ELU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ELU(), nn.MaxPool2d(2),
                    nn.Flatten(), nn.Linear(400, 120), nn.BatchNorm1d(120), nn.ReLU(), nn.Linear(120, 10))
rnn = nn.LSTM(3, 32, batch_first=True)
opt = torch.optim.Adam([*net.parameters(), *rnn.parameters()], lr=1e-3)
g = torch.Generator().manual_seed(1)
for _ in range(20):
    x, y, s = torch.randn(64, 1, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g), torch.randn(64, 24, 3, generator=g)
    loss = nn.functional.cross_entropy(net(x), y) + rnn(s)[0][:, -1].pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
h = hashlib.sha256()
for t in [*net.state_dict().values(), *rnn.state_dict().values()]:
    h.update(t.contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def weights_hash(mode: str, caps: dict) -> str:
    done = subprocess.run([sys.executable, "-c", TRAIN, mode], env=machine(caps), capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def machines_differ() -> bool:
    """Whether this host differs from the simulated AVX2, one-core machine at all (a one-core CPU
    without AVX-512 is that machine already)."""
    return torch.backends.cpu.get_cpu_capability() != "AVX2" or (os.cpu_count() or 1) > 1


def test_portable_trains_the_same_weights_on_both_machines():
    assert weights_hash("portable", {}) == weights_hash("portable", AVX2_CPU)


def test_portable_runs_mkl_on_the_branch_every_vendor_runs_alike():
    """MKL's AVX2 branch holds on Intel CPUs only (on an AMD EPYC it ran AUTO and the demo trained
    other weights): portable asks for COMPATIBLE, which MKL runs the same on Intel and AMD."""
    if "BLAS_INFO=mkl" not in torch.__config__.show():
        pytest.skip("this torch does not use MKL")
    done = subprocess.run([sys.executable, "-c", MKL_BRANCH], env=machine({}), capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "3"  # MKL_CBWR_COMPATIBLE


@pytest.mark.skipif(not machines_differ(), reason="this host is an AVX2 one-core machine: nothing to tell apart")
def test_fast_trains_different_weights_on_the_two_machines():
    """The check above can fail: without the pins the same seed gives other weights."""
    assert weights_hash("fast", {}) != weights_hash("fast", AVX2_CPU)


@pytest.mark.slow
def test_a_stage_is_portable_end_to_end(tmp_path):
    """`ratchet train` and `evaluate` on both machines: the same model bytes, metrics.json and
    per-epoch history.csv (the DVC plots in git: no wall time in it)."""
    make_image_tree(tmp_path / "data/raw/images")
    write_params(tmp_path, {"pipelines": {"image": tiny_image_section()}})
    ratchet(tmp_path, "prepare", "image")
    results = []
    for caps in ({}, AVX2_CPU):
        env = machine(caps)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
        for stage in ("train", "evaluate"):
            subprocess.run([sys.executable, "-m", "ratchet", stage, "image", "--params", str(tmp_path / "params.yaml")],
                           cwd=tmp_path, env=env, check=True, capture_output=True)
        state = torch.load(tmp_path / "models/image/model.pt", weights_only=True)["model"]
        digest = hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in state.values())).hexdigest()
        results.append((digest, (tmp_path / "reports/image/metrics.json").read_text(),
                        (tmp_path / "reports/image/plots/history.csv").read_text()))
    assert results[0] == results[1]
