"""The image family: ImageFolder preparation, augmentation, models, fine-tuning, reports."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (IMAGE_CLASSES, load_prepared, make_image_tree, mlflow_client, ratchet, runs_by_status, tiny_params,
                      write_params)
from PIL import Image

from ratchet.config import AugmentConfig, load_params
from ratchet.data.transforms import BatchAugment
from ratchet.families.image import FAMILY
from ratchet.train.distributed import DistInfo
from ratchet.train.loader import BatchLoader

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def prepare(project: Path, **overrides) -> dict:
    write_params(project, tiny_params(**overrides))
    ratchet(project, "prepare", "image")
    return load_prepared(project / "data/prepared/image").meta


def direct_decode(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """What a reader of the tree gets with Pillow, image by image: convert, resize (W, H)."""
    array = np.asarray(Image.open(path).convert(mode).resize(size[::-1], Image.Resampling.BILINEAR))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


@pytest.mark.parametrize("channels,mode", [("rgb", "RGB"), ("grayscale", "L")])
def test_decode_once_arrays_equal_a_direct_decode_of_every_image(project, channels, mode):
    meta = prepare(project, **{"image.data.channels": channels, "image.data.size": [12, 18]})
    prepared = load_prepared(project / "data/prepared/image")
    root = project / "data/raw/images"
    assert meta.input_shape == [len(mode), 12, 18]
    seen = []
    for split in ("train", "val", "test"):
        x, y, ids = prepared.array(f"{split}_x"), prepared.array(f"{split}_y"), prepared.array(f"{split}_ids")
        assert x.dtype == np.uint8 and isinstance(x, np.memmap)  # memory-mapped, compact
        for image, label, rel in zip(x, y, ids):
            np.testing.assert_array_equal(image, direct_decode(root / str(rel), mode, (12, 18)))
            assert meta.classes[label] == Path(str(rel)).parts[0]
        seen += list(ids)
    assert sorted(seen) == sorted(str(p.relative_to(root)) for p in root.rglob("img_*"))  # each image once


def test_class_names_keep_spaces_and_non_ascii_in_sorted_order(project):
    meta = prepare(project)
    assert meta.classes == sorted(IMAGE_CLASSES)
    assert "Zürich" in meta.classes and "blue sky" in meta.classes


def test_decomposed_unicode_folder_names_are_normalised(tmp_path):
    # macOS writes "ü" as "u" + combining diaeresis; the class name is the same either way.
    make_image_tree(tmp_path / "data/raw/images", per_class=8, classes=("a", unicodedata.normalize("NFD", "Zürich")))
    meta = prepare(tmp_path)
    assert meta.classes == ["Zürich", "a"]


def test_split_is_stratified_deterministic_and_changes_with_the_seed(project):
    first = prepare(project)
    ids = {s: list(load_prepared(project / "data/prepared/image").array(f"{s}_ids")) for s in ("train", "val", "test")}
    assert prepare(project).data_hash == first.data_hash
    assert [sum(c) for c in zip(*first.class_counts.values())] == [12] * 4
    assert all(min(counts) >= 1 for counts in first.class_counts.values())
    assert set(ids["train"]).isdisjoint(ids["val"]) and set(ids["train"]).isdisjoint(ids["test"])
    assert prepare(project, **{"image.seed": 8}).data_hash != first.data_hash


def test_separate_test_tree_is_the_test_split_and_validation_comes_from_training(tmp_path):
    make_image_tree(tmp_path / "data/raw/images/train", per_class=10)
    make_image_tree(tmp_path / "data/raw/images/test", per_class=5, seed=1, classes=IMAGE_CLASSES[:3])
    meta = prepare(tmp_path, **{"image.data.train": "train", "image.data.test": "test"})
    prepared = load_prepared(tmp_path / "data/prepared/image")
    assert meta.rows == {"train": 32, "val": 8, "test": 15}
    assert all(str(i).startswith("test/") for i in prepared.array("test_ids"))
    assert all(str(i).startswith("train/") for s in ("train", "val") for i in prepared.array(f"{s}_ids"))
    # test labels index the training tree's classes, not the test tree's own (one class fewer)
    for rel, label in zip(prepared.array("test_ids"), prepared.array("test_y")):
        assert meta.classes[label] == Path(str(rel)).parts[1]


def test_training_statistics_come_from_the_training_split_only(project):
    meta = prepare(project)
    x = load_prepared(project / "data/prepared/image").array("train_x").astype(np.float64) / 255
    np.testing.assert_allclose(meta.mean, x.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(meta.std, x.std(axis=(0, 2, 3)), rtol=1e-7)


def _corrupt(project: Path) -> Path:
    bad = project / "data/raw/images/dots/broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return bad


def _empty_class(project: Path) -> None:
    (project / "data/raw/images/empty class").mkdir()
    (project / "data/raw/images/empty class/notes.txt").write_text("no images here")


def _one_class(project: Path) -> None:
    for name in IMAGE_CLASSES[1:]:
        shutil.rmtree(project / "data/raw/images" / name)


def _unknown_test_class(project: Path) -> None:
    images = project / "data/raw/images"
    shutil.move(images, project / "data/raw/train")
    images.mkdir()
    shutil.move(project / "data/raw/train", images / "train")
    make_image_tree(images / "test", per_class=3, classes=("dots", "rain"))


BAD_TREES = {
    "missing root": (lambda p: shutil.rmtree(p / "data/raw/images"), {}, "data/raw/images: image folder not found"),
    "fewer than two classes": (_one_class, {}, "one class folder ('blue sky'); an ImageFolder tree needs at least two"),
    "empty class folder": (_empty_class, {}, "empty class: class folder has no images"),
    "corrupt image": (_corrupt, {}, "dots/broken.jpg: not a decodable image"),
    "test class unknown to training": (_unknown_test_class, {"image.data.train": "train", "image.data.test": "test"},
                                       "class folder 'rain' is not a class of the training tree"),
    "too few images for a split": (lambda p: [f.unlink() for f in list((p / "data/raw/images/dots").iterdir())[2:]],
                                   {}, "class 'dots' has 2 sample(s)"),
}


@pytest.mark.parametrize("case", BAD_TREES, ids=list(BAD_TREES))
def test_bad_image_trees_fail_with_one_clear_line_and_no_outputs(project, case):
    damage, overrides, message = BAD_TREES[case]
    damage(project)
    write_params(project, tiny_params(**overrides))
    proc = ratchet(project, "prepare", "image", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    prepared = project / "data/prepared"
    assert not (prepared / "image").exists()
    assert not prepared.exists() or list(prepared.iterdir()) == []  # no temporary leftovers either


def test_corrupt_image_is_skipped_with_a_warning_when_params_say_so(project):
    _corrupt(project)
    write_params(project, tiny_params(**{"image.data.on_bad_image": "skip"}))
    proc = ratchet(project, "prepare", "image")
    assert "warning: skipping dots/broken.jpg: not a decodable image" in proc.stdout
    meta = load_prepared(project / "data/prepared/image").meta
    assert meta.skipped == ["dots/broken.jpg"]
    assert sum(meta.rows.values()) == 48


def test_failed_prepare_keeps_the_previous_prepared_images(project):
    before = prepare(project)
    _corrupt(project)
    assert ratchet(project, "prepare", "image", check=False).returncode == 2
    assert load_prepared(project / "data/prepared/image").meta.data_hash == before.data_hash


BAD_PARAMS = {
    "image.data.channels": ("cmyk", "pipelines.image.data.channels: must be 'rgb' or 'grayscale'"),
    "image.data.size": ([4, 16], "image.data.size.0: must be greater than or equal to 8"),
    "image.augment.scale": ([1.2, 0.8], "image.augment: Value error, scale [1.2, 0.8]: min is larger than max"),
    "image.augment.hflip": (1.5, "pipelines.image.augment.hflip: must be less than or equal to 1"),
    "image.model.name": ("resnet", "image.model: must be"),
    "image.model.channels": ([], "pipelines.image.model.channels: List should have at least 1 item"),
    "image.data.on_bad_image": ("ignore", "pipelines.image.data.on_bad_image: must be 'fail' or 'skip'"),
}


@pytest.mark.parametrize("key", BAD_PARAMS)
def test_bad_image_params_name_the_key(project, key):
    value, message = BAD_PARAMS[key]
    overrides = {key: value}
    if key == "image.model.channels":
        overrides["image.model.name"] = "cnn"
    write_params(project, tiny_params(**overrides))
    proc = ratchet(project, "prepare", "image", check=False)
    assert proc.returncode == 2 and message.split(": ", 1)[0] in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not (project / "data/prepared").exists()


# -- augmentation -------------------------------------------------------------------------------

def _loader(prepared, transform, seed=7):
    return BatchLoader(prepared.split("train"), 16, CPU, train=True, seed=seed, transform=transform)


def test_augmentation_is_reproducible_with_the_seed_and_differs_per_epoch_and_seed(project):
    prepare(project)
    params = load_params(project / "params.yaml")
    cfg = params.pipeline("image")
    prepared = load_prepared(cfg.prepare.out_dir)

    def batches(seed: int, epoch: int) -> list[torch.Tensor]:
        cfg_seeded = cfg.model_copy(update={"seed": seed})
        loader = _loader(prepared, FAMILY.transforms(cfg_seeded, prepared.meta, CPU.device)[0], seed)
        loader.set_epoch(epoch)
        return [x for x, _ in loader]

    a, b = batches(7, 0), batches(7, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, batches(7, 1)))
    assert not torch.equal(a[0], batches(8, 0)[0])


def test_no_augmentation_at_evaluation_only_normalisation(project):
    meta = prepare(project)
    cfg = load_params(project / "params.yaml").pipeline("image")
    prepared = load_prepared(cfg.prepare.out_dir)
    train_t, eval_t = FAMILY.transforms(cfg, meta, CPU.device)
    x = torch.from_numpy(np.array(prepared.array("val_x")))
    mean, std = torch.tensor(meta.mean).view(1, -1, 1, 1), torch.tensor(meta.std).view(1, -1, 1, 1)
    expected = (x.float() / 255 - mean) / std
    for _ in range(2):  # the same every time: nothing random
        torch.testing.assert_close(eval_t(x), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(train_t(x), expected)  # while training, the same images change
    # and the evaluate stage's loader applies exactly the evaluation transform
    loader = BatchLoader(prepared.split("val"), 1000, CPU, train=False, transform=eval_t)
    torch.testing.assert_close(next(iter(loader))[0], expected, rtol=0, atol=1e-6)


def test_augmentation_draws_per_image_not_per_batch():
    images = torch.rand(1, 3, 16, 16).expand(64, 3, 16, 16).contiguous()
    flipped = BatchAugment(AugmentConfig(hflip=0.5), seed=0)(images)
    is_flipped = [torch.equal(f, images[0].flip(-1)) for f in flipped]
    assert 10 < sum(is_flipped) < 54  # some flipped, some not, in one batch
    assert all(f or torch.equal(img, images[0]) for f, img in zip(is_flipped, flipped))
    rotated = BatchAugment(AugmentConfig(rotation=30), seed=0)(images)
    assert len({round(float((r - images[0]).abs().sum()), 3) for r in rotated}) > 50  # 64 different angles


def test_affine_augmentation_geometry():
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 6] = 1.0  # a dot right of centre
    identity = BatchAugment(AugmentConfig(scale=(1.0, 1.0)), seed=0)
    assert not identity.active
    torch.testing.assert_close(identity._affine(image), image)  # the resampling itself is exact
    quarter = BatchAugment(AugmentConfig(rotation=90), seed=0)
    quarter._uniform = lambda n, low, high: torch.full((n,), high)  # rotate by exactly +90 degrees
    out = quarter._affine(image)
    assert out[0, 0].argmax().item() == 6 * 9 + 4  # the dot now lies below centre (y down)
    assert torch.equal(BatchAugment(AugmentConfig(hflip=1.0), seed=0)(image), image.flip(-1))


def test_streaming_from_disk_gives_the_same_batches_as_preloading(project):
    prepare(project)
    prepared = load_prepared(project / "data/prepared/image")
    for train in (True, False):
        memory = BatchLoader(prepared.split("train"), 5, CPU, train=train, seed=3)
        disk = BatchLoader(prepared.split("train"), 5, CPU, train=train, seed=3, preload_bytes=0)
        assert disk.streaming and not memory.streaming
        memory.set_epoch(2)
        disk.set_epoch(2)
        pairs = list(zip(memory, disk, strict=True))
        assert len(pairs) == len(memory) and all(torch.equal(a, b) for m, d in pairs for a, b in zip(m, d))


# -- models ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [
    {"name": "cnn", "channels": [8, 16]},
    {"name": "cnn", "channels": [4], "batchnorm": True, "dropout": 0.2},
    {"name": "lenet5"},
    {"name": "lenet5", "activation": "tanh", "pool": "avg", "init": "xavier"},
    {"name": "mlp", "hidden": [32]},
])
@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 40, 56)])
def test_image_models_take_the_prepared_shape_and_give_one_logit_per_class(model, shape):
    from pydantic import TypeAdapter

    from ratchet.config.models import ImageModelConfig
    cfg = TypeAdapter(ImageModelConfig).validate_python(model)
    meta = SimpleNamespace(input_shape=list(shape), classes=["a", "b", "c"])
    net = FAMILY.build_model(cfg, meta)
    assert net(torch.zeros(2, *shape)).shape == (2, 3)
    if model["name"] == "lenet5" and shape == (1, 32, 32):
        assert net.classifier[0].in_features == 16 * 5 * 5  # the paper's layout at 32x32


def test_demo_digits_tree_prepares_to_32x32_greyscale(tmp_path):
    from ratchet.data.demo import write_demo

    write_demo(tmp_path / "data/demo")  # scikit-learn's real handwritten digits as an ImageFolder tree
    meta = prepare(tmp_path, **{"image.data.source": "data/demo/digits", "image.data.channels": "grayscale",
                                "image.data.size": [32, 32]})
    assert meta.classes == [str(d) for d in range(10)]
    assert sum(meta.rows.values()) == 1797 and meta.input_shape == [1, 32, 32]


@pytest.mark.parametrize("activation", ["elu", "relu", "leaky_relu"])
def test_cnn_pooling_before_the_activation_is_the_course_cnn_exactly(activation):
    """The `cnn` pools before its activation (cheaper); the course's order, activation then pool,
    gives the same outputs and the same gradients with the same weights."""
    from torch import nn

    from ratchet.config import CNNConfig
    from ratchet.models.cnn import ACTIVATIONS, CNN

    torch.manual_seed(0)
    net = CNN([3, 16, 16], 5, CNNConfig(name="cnn", channels=[4, 8], activation=activation))
    act = ACTIVATIONS[activation]
    course = nn.Sequential(net.features[0], act(), nn.MaxPool2d(2), net.features[3], act(), nn.MaxPool2d(2),
                           nn.Flatten(), net.classifier)
    assert isinstance(net.features[1], nn.MaxPool2d)  # pool first in ours
    x = torch.randn(6, 3, 16, 16)
    ours, theirs = net(x), course(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    grad_ours = torch.autograd.grad(ours.sum(), net.features[0].weight)[0]
    grad_theirs = torch.autograd.grad(theirs.sum(), net.features[0].weight)[0]
    torch.testing.assert_close(grad_ours, grad_theirs)
