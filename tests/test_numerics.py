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
# set after pin() (oneDNN reads it when it makes its first kernel). Only the probe script below
# reads PIN_THEN; the end-to-end test's stages ignore it.
OTHER_KERNELS = {"PIN_THEN": '{"ONEDNN_MAX_CPU_ISA": "SSE41"}'}
AVX2_CPU = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1",
            **OTHER_KERNELS}
CAPS = (*AVX2_CPU, "MKL_NUM_THREADS")


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


@pytest.mark.skipif(not machines_differ(), reason="this host is an AVX2 one-core machine: nothing to tell apart")
def test_fast_trains_different_weights_on_the_two_machines():
    """The check above can fail: without the pins the same seed gives other weights."""
    assert weights_hash("fast", {}) != weights_hash("fast", AVX2_CPU)


@pytest.mark.slow
def test_a_stage_is_portable_end_to_end(tmp_path):
    """`ratchet train` and `evaluate` on both machines: the same model bytes and metrics.json."""
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
        results.append((digest, (tmp_path / "reports/image/metrics.json").read_text()))
    assert results[0] == results[1]
