"""Image family: ImageFolder trees (`<root>/<class>/<image>`) become uint8 arrays, decoded once.

Each image is decoded with Pillow once, converted to the configured channels, resized to the
configured size and written into a memory-mapped `(N, C, H, W)` uint8 array, so training never
touches a JPEG again and a dataset larger than RAM still works (nothing holds it all in memory).
Class names are the sorted folder names (Unicode-normalised to NFC, spaces and non-ASCII kept);
the test tree, when there is one, must use the training tree's classes.

Splits: with `data.test`, validation is split off the training tree (stratified, by seed) and
the test tree is the test split; without it one tree is split three ways. Per-channel mean and
std (pixel units / 255) come from the training split only; the trainer normalises batches with
them, and the registered model carries them, so it takes raw uint8 images.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ratchet.config import ImagePipeline
from ratchet.data.prepared import prepared_writer, project_path
from ratchet.data.split import stratified_split
from ratchet.errors import RatchetError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
MODES = {"rgb": "RGB", "grayscale": "L"}
CHUNK = 4096  # images per block when copying and computing statistics (bounded memory)


def prepare(cfg: ImagePipeline, root: Path, family: str = "image", scan=None, extra_meta=None) -> dict:
    """Scan, decode once, split, guard against files shared between splits, and write the
    prepared arrays; return meta.json's content (its paths relative to the project folder
    `root`). `scan(tree)` -> (class names, [(path, class)]) reads the tree's layout (default:
    `scan_tree`, one folder per class); `extra_meta(classes)` adds the family's own fields."""
    scan = scan or scan_tree
    data = cfg.data
    train_dir = data.source / data.train
    classes, train_files = scan(train_dir)
    test_files: list[tuple[Path, int]] = []
    if data.test is not None:
        test_classes, found = scan(data.source / data.test)
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise RatchetError(f"{data.source / data.test}: class folder '{unknown[0]}' is not a class of the "
                               f"training tree {train_dir} (classes: {', '.join(classes)})")
        index = {name: i for i, name in enumerate(classes)}
        test_files = [(path, index[test_classes[c]]) for path, c in found]

    files = train_files + test_files
    channels, (height, width) = len(MODES[data.channels]), data.size
    with prepared_writer(cfg.prepare.out_dir) as writer:
        decoded = np.lib.format.open_memmap(writer.tmp / "decoded.tmp", mode="w+", dtype=np.uint8,
                                            shape=(len(files), channels, height, width))
        ok, digests = decode_all([p for p, _ in files], decoded, MODES[data.channels], (width, height),
                                 data.on_bad_image, data.source)
        labels = np.array([c for _, c in files], dtype=np.int64)
        paths = np.array([_relative(p, data.source) for p, _ in files])
        n_train = len(train_files)
        if data.test is None:
            held_out = {"test": cfg.prepare.test_fraction, "val": cfg.prepare.val_fraction}
            pool = np.flatnonzero(ok)
        else:
            held_out = {"val": cfg.prepare.val_fraction}
            pool = np.flatnonzero(ok[:n_train])
        _check_classes(labels[pool], classes, train_dir, "training" if data.test is not None else "")
        parts = {split: pool[idx] for split, idx in stratified_split(labels[pool], classes, held_out, cfg.seed,
                                                                       train_dir).items()}
        if data.test is not None:
            parts["test"] = n_train + np.flatnonzero(ok[n_train:])
            if not len(parts["test"]):
                raise RatchetError(f"{data.source / data.test}: no decodable test images")

        parts = {split: parts[split] for split in ("train", "val", "test")}
        parts, duplicates = guard_duplicates(parts, digests, paths, data.duplicates, data.source)
        for split, idx in parts.items():
            out = writer.allocate(f"{split}_x", (len(idx), channels, height, width), np.uint8)
            for start in range(0, len(idx), CHUNK):
                out[start : start + CHUNK] = decoded[idx[start : start + CHUNK]]
            out.flush()
            del out
            writer.save(f"{split}_y", labels[idx])
            writer.save(f"{split}_ids", paths[idx])
            writer.save(f"{split}_keys", digest_keys(digests[idx]))  # the gate's overlap check (file contents)
        mean, std = channel_stats(decoded, parts["train"])
        del decoded
        (writer.tmp / "decoded.tmp").unlink()
        skipped = paths[~ok].tolist()
        meta = writer.finish({
            "family": family,
            "source": project_path(data.source, root),
            "id": "file",  # <split>_ids: image paths relative to data.source
            "serving_input": "test_x",  # what a registered model takes: uint8 images, N x C x H x W
            "channels": data.channels,
            "size": [height, width],
            "input_shape": [channels, height, width],
            "classes": classes,
            "rows": {split: int(len(idx)) for split, idx in parts.items()},
            "class_counts": {s: np.bincount(labels[i], minlength=len(classes)).tolist() for s, i in parts.items()},
            "mean": mean,
            "std": std,
            "skipped": skipped,
            "duplicates": duplicates,
            "seed": cfg.seed,
            **(extra_meta(classes) if extra_meta else {}),
        })
    if skipped:
        print(f"skipped {len(skipped)} image(s) that do not decode (listed in meta.json 'skipped')")
    return meta


def scan_tree(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted folder names) and (image path, class index) pairs, sorted by path.
    A class folder holding folders is refused: it is a two-level tree (the multihead family's),
    whose subfolders would otherwise merge silently into their parent class."""
    names, folders = class_folders(root, f"{root}/<class>/<image>")
    files: list[tuple[Path, int]] = []
    for c, folder in enumerate(folders):
        inner = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if inner:
            raise RatchetError(f"{folder}: class folder holds folders ({', '.join(inner[:3])}"
                               f"{', ...' if len(inner) > 3 else ''}); an image tree is {root}/<class>/<image> "
                               "(for <group>/<class>/<image>, use family: multihead)")
        files += [(p, c) for p in images_in(folder)]
    return names, files


def class_folders(root: Path, layout: str, minimum: int = 2, kind: str = "class folder",
                  tree: str = "an ImageFolder tree") -> tuple[list[str], list[Path]]:
    """The visible subfolders of `root`, sorted, with their NFC names; at least `minimum`."""
    if not root.is_dir():
        raise RatchetError(f"{root}: image folder not found" if not root.exists() else f"{root}: not a folder")
    folders = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                     key=lambda d: _nfc(d.name))
    names = [_nfc(d.name) for d in folders]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise RatchetError(f"{root}: two {kind}s are both named '{dup}' (after Unicode normalisation)")
    if len(folders) < minimum:
        found = f"one {kind} ('{names[0]}')" if names else f"no {kind}s"
        raise RatchetError(f"{root}: {found}; {tree} needs at least {'one two'.split()[minimum - 1]}: {layout}")
    return names, folders


def images_in(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted; at least one."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file()
                    and not p.name.startswith("."))
    if not images:
        inner = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if inner:  # e.g. a source holding train/ and test/ trees, with data.train and data.test unset
            raise RatchetError(f"{folder}: holds folders ({', '.join(inner[:3])}{', ...' if len(inner) > 3 else ''}), "
                               "not images: the tree is one level deeper than expected (set data.train and "
                               "data.test to its subtrees?)")
        raise RatchetError(f"{folder}: class folder has no images ({', '.join(EXTENSIONS)})")
    return images


def guard_duplicates(parts: dict[str, np.ndarray], digests: np.ndarray, paths: np.ndarray, policy: str,
                     source: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Find validation and test files byte-identical to a file of an earlier split (train, then
    val), whatever their names: a model scored on its own training images looks better than it
    is. `fail` stops with the count and one example pair, `drop` removes them from the later
    split, `keep` keeps them with a warning. Returns the splits and what was found (meta.json)."""
    first: dict[str, tuple[int, str]] = {}  # content digest -> the first file with it and its split
    found = {"val": 0, "test": 0}
    example = None
    kept = dict(parts)
    for split in ("train", "val", "test"):
        shared = []
        for i in parts[split]:
            other, where = first.setdefault(digests[i], (i, split))
            if where != split:  # the same bytes in an earlier split (copies within one split do not leak)
                shared.append(i)
                example = example or [str(paths[i]), str(paths[other])]
        if split != "train":
            found[split] = len(shared)
            if policy == "drop":
                kept[split] = np.setdiff1d(parts[split], np.array(shared, dtype=np.int64))
    total = found["val"] + found["test"]
    if total and policy == "fail":
        raise RatchetError(f"{source}: {total} evaluation files (val {found['val']}, test {found['test']}) are "
                           f"byte-identical to files of an earlier split, e.g. {example[0]} = {example[1]}; "
                           "set data.duplicates: drop (score on the rest) or keep")
    if total:
        verb = "dropped from" if policy == "drop" else "kept in (data.duplicates: keep)"
        print(f"warning: {total} files byte-identical to an earlier split's {verb} val ({found['val']}) "
              f"and test ({found['test']}), e.g. {example[0]} = {example[1]}")
    if policy == "drop" and not len(kept["test"]):
        raise RatchetError(f"{source}: every test file is a copy of a training or validation file")
    return kept, {"policy": policy, **found, "example": example}


def decode(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One image as a (C, H, W) uint8 array: converted to `mode` (high-depth images by their real
    range, see to_uint8), resized to `size` (W, H), bilinear."""
    with Image.open(path) as image:
        if image.mode in HIGH_DEPTH:
            image = Image.fromarray(to_uint8(np.asarray(image)), mode="L")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-with-transparency notices: converting is the point
            image = image.convert(mode)
        array = np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def digest_keys(digests: np.ndarray) -> np.ndarray:
    """64-bit sample keys from SHA-256 hex digests of the files' bytes (their first 16 hex digits)."""
    return np.array([int(d[:16], 16) for d in digests], dtype=np.uint64)


HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # one channel of more than 8 bits


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """A high-depth single-channel image as 0..255 by its real range (Pillow's own conversion
    clips every value above 255 to white): integers of up to 16 bits by the 16-bit range, floats
    in [0, 1] by that range, anything else by its own minimum and maximum."""
    values = pixels.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if np.issubdtype(pixels.dtype, np.integer) and low >= 0 and high <= 65535:
        low, high = 0.0, 65535.0
    elif np.issubdtype(pixels.dtype, np.floating) and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    if not np.isfinite([low, high]).all():
        raise ValueError("pixel values are not finite")
    scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def decode_all(paths: list[Path], out: np.ndarray, mode: str, size: tuple[int, int], on_bad: str,
               root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode `paths` into `out` in parallel (Pillow releases the GIL); return which decoded and
    the SHA-256 of each file's bytes (for the duplicate guard)."""
    ok = np.ones(len(paths), dtype=bool)
    digests = np.empty(len(paths), dtype=object)

    def work(i: int) -> None:
        try:
            digests[i] = hashlib.sha256(paths[i].read_bytes()).hexdigest()
            out[i] = decode(paths[i], mode, size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            if on_bad == "fail":
                raise RatchetError(f"{paths[i]}: not a decodable image ({_reason(exc)}); "
                                   "fix or remove it, or set data.on_bad_image: skip") from None
            ok[i] = False
            tqdm.write(f"warning: skipping {_relative(paths[i], root)}: not a decodable image ({_reason(exc)})")

    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    try:
        for _ in tqdm(pool.map(work, range(len(paths))), total=len(paths), desc="decoding images", unit="img",
                      mininterval=1, delay=2):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on the first failure, decode nothing more
    return ok, digests


def channel_stats(images: np.ndarray, idx: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of images[idx] in [0, 1] units, accumulated in blocks."""
    channels = images.shape[1]
    total, squares, count = np.zeros(channels), np.zeros(channels), 0
    for start in range(0, len(idx), CHUNK):
        block = images[idx[start : start + CHUNK]].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 2, 3))
        squares += (block**2).sum(axis=(0, 2, 3))
        count += block.shape[0] * block.shape[2] * block.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    std[std < 1e-6] = 1.0  # a constant channel normalises to zeros, not NaN
    return mean.tolist(), std.tolist()


def _check_classes(labels: np.ndarray, classes: list[str], tree: Path, which: str) -> None:
    counts = np.bincount(labels, minlength=len(classes))
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise RatchetError(f"{tree / classes[empty[0]]}: no decodable {which + ' ' if which else ''}images left "
                           "in this class")


def _relative(path: Path, root: Path) -> str:
    try:
        return _nfc(str(path.relative_to(root)))
    except ValueError:
        return _nfc(str(path))


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
