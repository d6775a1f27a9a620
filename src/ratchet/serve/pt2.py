"""Load a torch.export archive (MLflow's pt2 format) without running pickled code."""

from __future__ import annotations

from pathlib import Path

from ratchet.errors import RatchetError


def load_pt2(path: Path, label: str):
    """The `nn.Module` of the archive at `path`, after MLflow's check that it holds no pickled
    objects; one line naming `label` (e.g. "registered model 'tabular' v3") if it does not load."""
    check_pickle_free(path, label)
    return load_program(path, label)


def check_pickle_free(path: Path, label: str) -> None:
    """MLflow's check that the archive holds no pickled objects (it reads each record with
    torch's weights-only unpickler); one line naming `label` if it does."""
    from mlflow.exceptions import MlflowException

    try:
        from mlflow.pytorch import _validate_pt2_archive_is_pickle_free  # MLflow's own check of the archive
    except ImportError:
        return
    try:
        _validate_pt2_archive_is_pickle_free(str(path))
    except MlflowException:
        raise RatchetError(f"{label}: its model.pt2 holds pickled objects, whose loading runs code; "
                           "refusing it") from None


def load_program(path: Path, label: str):
    """The `nn.Module` of an archive `check_pickle_free` has passed (torch only: no MLflow)."""
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # a corrupt or foreign archive: one line, whatever torch raises
        raise RatchetError(f"{label}: model.pt2 does not load ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return program.module()
