"""The promotion gate's scoring, in a worker process that starts before the stage reads the registry.

The promote stage's own work takes a fraction of a second on a small pipeline; its start-up is
imports: MLflow with its SQL store (~1.7 s on 2 cores), torch (~1.2 s) and torch.export's pt2
loader (~1.3 s: it imports torch._dynamo and sympy). The stage reads the registry with MLflow and
scores with torch, so the two halves run in two processes: `Scorer(numerics, cfg)` starts
`python -m ratchet.tracking.scorer`, which pins the numerics (ratchet.numerics), imports torch,
the loader and the metrics, and reads the pipeline's prepared test split, on the second core
while the stage imports MLflow, reads the registry and downloads each version's program.
`score()` then sends the worker one program (a local path the stage has checked to hold no
pickled objects) and the indices of the test samples to score, and gets the metric back. With
fewer than 2 CPUs to use (the process's affinity, capped by a container's CPU quota) the two
processes would import torch twice on one core (~1 s slower than one process), and a process
that has imported torch already (promote.run called from Python: a test, a notebook) has nothing
to overlap: in both cases it scores in the stage's own process instead.

The worker's failures come back as the stage's own: a RatchetError (a program that does not
load) is raised here with its message, a worker that died (killed, out of memory) is a
StageFailed (a retry may fix it), anything else a RuntimeError carrying the worker's traceback.
Messages are pickled over the worker's stdin and stdout (its prints go to stderr, the stage's log).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

from ratchet.errors import RatchetError, StageFailed

STOP_SECONDS = 10  # how long close() waits for an idle worker to exit before killing it


class Scorer:
    """Scores pt2 programs on `cfg`'s test split, under `numerics`: in a worker process started
    now, or with `process` False in this one. By default a worker, unless fewer than 2 CPUs are
    usable or this process has imported torch already (a test, a notebook: nothing to overlap)."""

    def __init__(self, numerics, cfg, process: bool | None = None):
        self._proc = self._test = None
        self._cfg = cfg
        torch_here = "torch" in sys.modules
        if process is None:
            process = usable_cpus() >= 2 and not torch_here
        if process:
            self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE)
            self._send((numerics, cfg), "starting the scoring process")
        elif not torch_here:
            from ratchet.numerics import pin

            pin(numerics)  # this process will score: its kernels pinned before it imports torch

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def score(self, program: Path, label: str, keep, metric: str) -> float:
        """`metric` of the program at `program` on the test samples at indices `keep` (all of
        them for None), scored by the pipeline's family, as `Family.score` computes it."""
        if self._proc is None:
            if self._test is None:
                self._test = _start(self._cfg)
            return _score(self._cfg, self._test, Path(program), label, keep, metric)
        self._send((str(program), label, keep, metric), f"scoring {label}")
        try:
            status, value = pickle.load(self._proc.stdout)
        except (EOFError, pickle.UnpicklingError, OSError):
            raise self._died(f"scoring {label}") from None
        if status == "error":
            raise RatchetError(value)
        if status == "failed":
            raise RuntimeError(f"scoring {label} failed in the scoring process:\n{value}")
        return value

    def close(self, kill: bool = False) -> None:
        """End the worker: at the end of its input it exits; killed if `kill` or still busy."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
            try:
                self._proc.wait(timeout=0 if kill else STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.close(kill=kind is not None)  # after a failure or Ctrl-C nothing waits for its imports

    def _send(self, message, doing: str) -> None:
        try:
            pickle.dump(message, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.flush()
        except OSError:  # BrokenPipeError: it is gone
            raise self._died(doing) from None

    def _died(self, doing: str) -> StageFailed:
        code = self._proc.wait()
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return StageFailed(f"{doing}: the scoring process {how} (its log is above)")


def usable_cpus() -> float:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (`cpu.max`:
    docker's --cpus, a Kubernetes CPU limit), which the affinity does not show."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on this OS (macOS)
        cpus = float(os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cpus


def main() -> None:
    """The worker: its first message is (numerics, cfg), then (program, label, keep, metric) per score."""
    import signal
    import traceback

    from ratchet.cli import skip_final_collection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the stage too, which ends this process
    skip_final_collection()  # the stage waits for this process to exit
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library's print goes to the log, never into the replies
    requests = sys.stdin.buffer
    try:
        numerics, cfg = pickle.load(requests)
    except EOFError:
        return
    try:
        from ratchet.numerics import pin

        pin(numerics)  # imports torch, with the kernel caps in place
        test = _start(cfg)
    except Exception as exc:  # reported with the first score asked for
        test = exc
    while True:
        try:
            program, label, keep, metric = pickle.load(requests)
        except EOFError:
            return
        try:
            if isinstance(test, Exception):
                raise test
            reply = ("ok", _score(cfg, test, Path(program), label, keep, metric))
        except RatchetError as exc:
            reply = ("error", str(exc))
        except Exception:
            reply = ("failed", traceback.format_exc())
        pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()


def _start(cfg) -> tuple:
    """Import what scoring uses and read the test split: (family, meta, x, y)."""
    import contextlib

    from ratchet.families import get_family
    from ratchet.lazy_imports import defer_torchmetrics

    with contextlib.suppress(ImportError):  # what torch.export.load imports on its first call
        import torch.export.pt2_archive._package  # noqa: F401
    defer_torchmetrics()
    import torchmetrics.metric  # noqa: F401  (every family's metrics are torchmetrics')

    family = get_family(cfg.family)
    prepared = family.load(cfg.prepare.out_dir)
    return (family, prepared.meta, *family.gate_data(cfg, prepared))


def _score(cfg, test: tuple, program: Path, label: str, keep, metric: str) -> float:
    from ratchet.serve.pt2 import load_program
    from ratchet.train.batch import tree_map

    family, meta, x, y = test
    if keep is not None:
        x, y = tree_map(lambda a: a[keep], x), tree_map(lambda a: a[keep], y)
    return family.score(cfg, load_program(program, label), meta, x, y, metric)


if __name__ == "__main__":
    main()
