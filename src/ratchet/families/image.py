"""The image family: ImageFolder trees (`<root>/<class>/<image>`) -> the course CNN, LeNet-5 or
an MLP on pixels.

Prepare (data/image.py) decodes every image once into memory-mapped uint8 arrays. Training
batches are converted, augmented per image and normalised on the device (data/transforms.py)
and convolutions run channels-last. The served model takes uint8 images (N, C, H, W).
"""

from __future__ import annotations

from pathlib import Path

from ratchet.config.image import ImagePipeline
from ratchet.families.classification import ClassificationMeta, ClassifierFamily


class ImageMeta(ClassificationMeta):
    channels: str
    size: list[int]
    mean: list[float]
    std: list[float]
    skipped: list[str]
    duplicates: dict  # the leakage guard: policy, val and test files found shared with an earlier split, example


class ImageFamily(ClassifierFamily):
    name = "image"
    schema = ImagePipeline
    Meta = ImageMeta

    def prepare(self, cfg: ImagePipeline, root: Path) -> ImageMeta:
        from ratchet.data.image import prepare

        return ImageMeta.model_validate(prepare(cfg, root))

    def transforms(self, cfg: ImagePipeline, meta: ImageMeta, device):
        from ratchet.data.transforms import BatchAugment, Compose, Normalize, ToUnitFloat

        normalize = Normalize(meta.mean, meta.std)
        augment = BatchAugment(cfg.augment, cfg.seed, device)
        train = Compose(ToUnitFloat(), augment, normalize) if augment.active else Compose(ToUnitFloat(), normalize)
        return train, Compose(ToUnitFloat(), normalize)

    def memory_format(self, meta):
        import torch

        return torch.channels_last  # Normalize lays batches out channels-last too

    def build_model(self, model_cfg, meta: ImageMeta):
        import math

        from ratchet.models.cnn import CNN, LeNet5
        from ratchet.models.mlp import MLP

        classes = len(meta.classes)
        if model_cfg.name == "mlp":
            return MLP(math.prod(meta.input_shape), classes, model_cfg)
        return {"cnn": CNN, "lenet5": LeNet5}[model_cfg.name](meta.input_shape, classes, model_cfg)

    def on_train_start(self, cfg: ImagePipeline, prepared) -> None:
        """Class weights, what the leakage guard found, and a PNG grid in MLflow: 8 training images as stored,
        then three augmented draws of each."""
        import tempfile
        from pathlib import Path

        import mlflow
        import numpy as np
        import torch
        from torchvision.utils import save_image

        from ratchet.data.transforms import augmentation_preview

        super().on_train_start(cfg, prepared)
        found = prepared.meta.duplicates
        mlflow.log_params({"data.duplicates_found.val": found["val"], "data.duplicates_found.test": found["test"]})
        x = prepared.array("train_x")
        images = torch.from_numpy(np.array(x[np.linspace(0, len(x) - 1, min(8, len(x))).astype(int)]))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "augmented_samples.png"
            save_image(augmentation_preview(images, cfg.augment, cfg.seed), path)
            mlflow.log_artifact(str(path), "plots")

    def check_init_from(self, saved_model_cfg: dict, cfg, source: str) -> None:
        pass  # a head of another class count is replaced; matching shapes are the rest

    def write_report(self, name, cfg, prepared, metrics, predictions, out) -> None:
        super().write_report(name, cfg, prepared, metrics, predictions, out)
        _misclassified_png(name, prepared, predictions, out / "misclassified.png")

    def serving_model(self, cfg, net, meta: ImageMeta):
        from torch import nn

        from ratchet.models.serving import ImagePreprocess

        return nn.Sequential(ImagePreprocess(meta.mean, meta.std), net).eval()

    def example_input(self, cfg, meta: ImageMeta):
        """A black image and one of the training mean colour."""
        import numpy as np

        mean = np.round(np.array(meta.mean) * 255).astype(np.uint8)
        flat = np.broadcast_to(mean[:, None, None], meta.input_shape)
        return np.stack([np.zeros(meta.input_shape, np.uint8), flat])

    def input_description(self, cfg, meta: ImageMeta) -> str:
        c, h, w = meta.input_shape
        return f"images: uint8 {c}x{h}x{w} ({meta.channels}); classes: " + ", ".join(meta.classes)

    def serving_spec(self, cfg, meta: ImageMeta) -> dict:
        from ratchet.data.image import MODES

        return {"classes": meta.classes, "mode": MODES[meta.channels], "size": meta.size}

    def serving_signature(self, spec: dict) -> tuple:
        from mlflow.types import ColSpec, Schema

        from ratchet.serve.frames import IMAGE_COLUMN, class_schema

        return Schema([ColSpec("string", IMAGE_COLUMN)]), Schema(class_schema(spec["classes"]))

    def serving_example(self, spec: dict, cfg, meta: ImageMeta):
        import pandas as pd

        from ratchet.serve.frames import IMAGE_COLUMN, encode_array

        examples = ImageFamily.example_input(self, cfg, meta)  # the images alone (a subclass may add inputs)
        return pd.DataFrame({IMAGE_COLUMN: [encode_array(a) for a in examples]})

    def frame_inputs(self, spec: dict, frame) -> tuple:
        from ratchet.serve.frames import images

        return (images(frame, spec["mode"], spec["size"]),)

    def read_input(self, spec: dict, path):
        """An image file, or every image under a folder (an ImageFolder tree too), by path."""
        import pandas as pd

        from ratchet.serve.frames import IMAGE_COLUMN, encode_file, image_files

        files, root = image_files(path)
        names = pd.Index([str(p.relative_to(root)) for p in files], name="file")
        return pd.DataFrame({IMAGE_COLUMN: [encode_file(p) for p in files]}, index=names), []


def _misclassified_png(name: str, prepared, predictions: list[tuple[int, int]], path, limit: int = 30) -> None:
    from ratchet.evaluate.plots import image_grid_png

    classes = prepared.meta.classes
    y = prepared.array("test_y")
    wrong = [(i, p) for i, p in predictions if p != int(y[i])]
    shown = wrong[:limit]
    images = prepared.array("test_x")[[i for i, _ in shown]] if shown else []
    captions = [f"{classes[int(y[i])]}\n-> {classes[p]}" for i, p in shown]
    more = f", first {len(shown)} shown" if len(wrong) > len(shown) else ""
    image_grid_png(images, captions, path, f"{name}: {len(wrong)} misclassified test images (actual -> predicted){more}")


FAMILY = ImageFamily()
