"""Pin the numeric kernels before torch starts, so that results do not depend on the machine.

On the CPU, torch's results depend on which kernels run, and three libraries pick them by the
CPU they find: oneDNN (convolutions, some matmuls), MKL (BLAS: linear layers, LSTM gates,
convolutions without oneDNN) and ATen's own vectorised loops (elementwise ops, reductions). An
AVX-512 machine and an AVX2 one sum in different orders, so the same seed trains different
weights after a few steps; so do 2 and 4 intra-op threads (reductions are split per thread).
`numerics.mode: portable` caps ATen at AVX2, fixes the thread count, keeps oneDNN out
(`torch.backends.mkldnn` off: convolutions and LSTMs then run as ATen loops over MKL GEMMs) and
runs MKL on its COMPATIBLE branch (SSE2 without the approximate rcpps/rsqrtps), the one branch
MKL runs alike on Intel and non-Intel CPUs. Each of these was found the hard way: capped at
AVX2, oneDNN still chose other kernels on two AVX-512 machines of the same kind (its blocking
follows the CPU's caches: demo CNN test accuracy 0.9851 on one, 0.9814 on the other), and
MKL's AVX2 branch (`MKL_CBWR=AVX2`) is Intel-only: on an AMD EPYC MKL ignores it and takes its
AUTO branch (`mkl_serv_cbwr_get` says 2, not 10), so the demo CNN, LSTM and Omniglot nets
trained other weights there than on the Intel machines that made the committed results. Any
x86-64 machine with AVX2 or better (Intel or AMD, Haswell/Zen onwards) then computes bitwise
the same weights and metrics from the same params; `fast` leaves torch's defaults (this CPU's
widest kernels, oneDNN, all its cores).

The caps are environment variables each library reads once, when it initialises: `pin()` must
run before torch is imported. `ratchet` calls it after reading params.yaml and before it
imports a stage; torchrun's workers inherit the environment and call it again; promote runs no
torch kernel itself, and its scoring process calls it (ratchet.tracking.scorer). On a CPU that
is not x86-64 (ARM) only the threads and deterministic algorithms are pinned: results then
repeat on the same kind of machine. On CUDA, portable turns on torch's deterministic
algorithms and cuBLAS's fixed workspace: runs repeat on the same GPU model, not across models.
"""

from __future__ import annotations

import os
import platform

from ratchet.config import NumericsConfig

# What each library reads at start-up. AVX2 is the widest set every x86-64 machine of the last
# ten years has. MKL's branches other than AUTO and COMPATIBLE are for Intel CPUs only (MKL's
# developer guide; elsewhere it falls back to AUTO, this CPU's own); STRICT also makes its
# results independent of memory alignment.
MKL_BRANCH = "COMPATIBLE"
X86_CAPS = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": f"{MKL_BRANCH},STRICT",
    "ATEN_CPU_CAPABILITY": "avx2",
}
CUBLAS = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS (torch's docs on reproducibility)
X86 = ("x86_64", "amd64", "x64")


def pin(cfg: NumericsConfig) -> None:
    """Set the kernel caps and thread count of `cfg` for this process and the ones it starts."""
    if cfg.mode == "fast":
        return
    env = dict(CUBLAS)
    if platform.machine().lower() in X86:
        env.update(X86_CAPS)
    threads = str(cfg.threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    os.environ.update(env)
    # Then torch, with the caps in place (if something imported it earlier, a test or a notebook,
    # the caps it has read stay; the thread count and algorithms below still apply).
    import torch

    torch.set_num_threads(cfg.threads)
    # Deterministic algorithms, warn-only: an op without a deterministic kernel (a few CUDA
    # scatters) warns instead of failing. Not torch.use_deterministic_algorithms(): it also sets
    # torch.compile's flag, importing inductor and dynamo (~2 s of every stage's start-up).
    torch.set_deterministic_debug_mode("warn")
    torch.backends.cudnn.benchmark = False
    torch.backends.mkldnn.enabled = False  # oneDNN's kernels depend on more of the CPU than its ISA
