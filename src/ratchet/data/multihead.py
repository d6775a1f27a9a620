"""Two-level image trees, `<root>/<group>/<class>/<image>` (Omniglot: alphabet/character).

A class is the pair (group, class folder): `character01` of one alphabet is another class than
`character01` of the next, and its name is `group/class`. Everything else (decoding once, the
splits, the duplicate guard, statistics) is the image family's prepare (data/image.py).
"""

from __future__ import annotations

from pathlib import Path

from ratchet.data.image import class_folders, images_in
from ratchet.errors import RatchetError


def scan_groups(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names `group/class` (sorted by group, then class) and (image path, class index) pairs."""
    layout = f"{root}/<group>/<class>/<image>"
    groups, group_dirs = class_folders(root, layout, minimum=1, kind="group folder", tree="a two-level tree")
    classes: list[str] = []
    files: list[tuple[Path, int]] = []
    for group, folder in zip(groups, group_dirs):
        loose = [p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        if loose:
            raise RatchetError(f"{folder}: holds files ({loose[0]}, ...) beside its class folders; "
                               f"a two-level tree is {layout}")
        names, class_dirs = class_folders(folder, layout, minimum=1, tree="a group folder")
        for name, class_dir in zip(names, class_dirs):
            files += [(p, len(classes)) for p in images_in(class_dir)]
            classes.append(f"{group}/{name}")
    if len(classes) < 2:
        raise RatchetError(f"{root}: one class ({classes[0]}); a classifier needs at least two: {layout}")
    return classes, files


def group_meta(classes: list[str]) -> dict:
    """meta.json's group fields: the group names and each class's group index."""
    groups = sorted({name.split("/", 1)[0] for name in classes})
    index = {g: i for i, g in enumerate(groups)}
    return {"groups": groups, "class_group": [index[name.split("/", 1)[0]] for name in classes]}
