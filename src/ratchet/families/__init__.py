"""The family registry: `family:` in a params.yaml section -> the module that implements it.

Adding a family is one module here (a `Family` subclass and `FAMILY = ThatFamily()`, see
`families/base.py`) plus its params schema, and one line in `FAMILIES`. Modules are imported
when a pipeline of that family is loaded, so a family nobody uses costs nothing.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module

from ratchet.errors import RatchetError
from ratchet.families.base import Family, PreparedMeta, monitor_mode  # noqa: F401  (the contract)

FAMILIES: dict[str, str] = {
    "tabular": "ratchet.families.tabular",
    "image": "ratchet.families.image",
    "sequence": "ratchet.families.sequence",
    "multihead": "ratchet.families.multihead",
}


@cache
def get_family(name: str) -> Family:
    """The registered family `name`; a RatchetError for an unknown one, or for a module that
    does not implement the whole contract (a missing hook is an error here, not a default)."""
    if name not in FAMILIES:
        raise RatchetError(f"unknown family '{name}'; families: {', '.join(FAMILIES)}")
    try:
        module = import_module(FAMILIES[name])
    except TypeError as exc:  # `FAMILY = ThatFamily()` with an abstract hook left out
        raise RatchetError(f"family '{name}' ({FAMILIES[name]}): {exc}") from None
    cls = getattr(module, "FAMILY", None)
    if not isinstance(cls, Family):
        raise RatchetError(f"family '{name}': {FAMILIES[name]} defines no FAMILY (a Family instance)")
    missing = [attr for attr in ("name", "schema", "Meta", "monitors", "gate_metrics") if not hasattr(cls, attr)]
    if missing:
        raise RatchetError(f"family '{name}': {type(cls).__name__} does not set {', '.join(missing)}")
    if cls.name != name:
        raise RatchetError(f"family '{name}': {type(cls).__name__}.name is '{cls.name}'")
    return cls
