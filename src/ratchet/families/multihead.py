"""The multihead family: two-level image trees (`<source>/<group>/<class>/<image>`) -> a network
with several inputs and heads (families of the course: Omniglot's image + alphabet -> character,
and image -> alphabet and character).

`model.inputs` ([image] or [image, group]) and `model.heads` ({class: 1.0} or {group: 0.3,
class: 1.0}) choose the network; the loss is the weighted sum of each head's cross-entropy, and
every head has its own validation and test metrics (`val_<head>_accuracy`, `class.f1_macro`),
report and confusion summary. Data preparation, augmentation, the duplicate guard and channels-
last training are the image family's: this family is an image family with groups.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ratchet.config.multihead import MultiheadPipeline
from ratchet.families.classification import GATE_METRICS
from ratchet.families.image import ImageFamily, ImageMeta

HEADS = ("class", "group")
MATRIX_PNG_LIMIT = 30  # classes up to which a head's confusion matrix is drawn; above, a CSV and a summary
MOST_CONFUSED = 20


class MultiheadMeta(ImageMeta):
    groups: list[str]
    class_group: list[int]  # group index of each class


class KeyTransform:
    """A batch transform applied to one input of a dict of inputs (the image)."""

    def __init__(self, key: str, transform):
        self.key, self.transform = key, transform

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        self.transform.set_epoch(epoch, rank)

    def __call__(self, inputs: dict) -> dict:
        return {**inputs, self.key: self.transform(inputs[self.key])}


class MultiheadFamily(ImageFamily):
    name = "multihead"
    schema = MultiheadPipeline
    Meta = MultiheadMeta
    monitors = ("val_loss", *(f"val_loss_{h}" for h in HEADS),
                *(f"val_{h}_{m}" for h in HEADS for m in ("accuracy", "f1_macro")))
    gate_metrics = tuple(f"{h}.{m}" for h in HEADS for m in GATE_METRICS)

    def prepare(self, cfg: MultiheadPipeline, root: Path) -> MultiheadMeta:
        from ratchet.data.image import prepare
        from ratchet.data.multihead import group_meta, scan_groups

        meta = prepare(cfg, root, family=self.name, scan=scan_groups, extra_meta=group_meta)
        return MultiheadMeta.model_validate(meta)

    def describe(self, meta: MultiheadMeta) -> str:
        return f"{len(meta.classes)} classes in {len(meta.groups)} groups"

    def samples(self, cfg: MultiheadPipeline, prepared, split: str) -> tuple:
        """Inputs {image[, group]} and targets {class[, group]} as `model.inputs` and
        `model.heads` name them; a sample's group is the group of its class."""
        y = np.asarray(prepared.array(f"{split}_y"))
        group = np.asarray(prepared.meta.class_group, dtype=np.int64)[y]
        inputs, targets = {"image": prepared.array(f"{split}_x"), "group": group}, {"class": y, "group": group}
        return ({key: inputs[key] for key in cfg.model.inputs},
                {head: targets[head] for head in sorted(cfg.model.heads, key=HEADS.index)})

    def on_train_start(self, cfg: MultiheadPipeline, prepared) -> None:
        """The image family's, and the group head's loss weights when `train.class_weights` sets them."""
        import re

        import mlflow

        super().on_train_start(cfg, prepared)
        balanced = _balanced_weights(cfg, prepared.meta)
        if balanced is not None and "group" in cfg.model.heads:
            mlflow.log_params({f"class_weight.group.{re.sub(r'[^A-Za-z0-9_. /-]', '_', name)}": round(w, 6)
                               for name, w in zip(prepared.meta.groups, balanced["group"])})

    def transforms(self, cfg, meta, device):
        train, evaluation = super().transforms(cfg, meta, device)
        return KeyTransform("image", train), KeyTransform("image", evaluation)

    def build_model(self, model_cfg, meta: MultiheadMeta):
        from ratchet.models.multihead import MultiHeadNet

        return MultiHeadNet(meta.input_shape, len(meta.groups), _outputs(meta), model_cfg)

    def objective(self, cfg: MultiheadPipeline, meta: MultiheadMeta, device):
        import torch
        from torch import nn
        from ratchet.lazy_imports import defer_torchmetrics

        defer_torchmetrics()
        from torchmetrics.wrappers import MultitaskWrapper

        from ratchet.evaluate.metrics import validation_metrics

        weights = dict(cfg.model.heads)
        balanced = _balanced_weights(cfg, meta)
        losses = {head: nn.CrossEntropyLoss(weight=None if balanced is None else
                                            torch.tensor(balanced[head], dtype=torch.float32, device=device))
                  for head in weights}

        def loss(outputs: dict, targets: dict):
            parts = {head: losses[head](outputs[head], targets[head]) for head in weights}
            return sum(weights[head] * part for head, part in parts.items()), parts

        sizes = _outputs(meta)
        metrics = MultitaskWrapper({head: validation_metrics(sizes[head], device) for head in weights})
        return loss, metrics.to(device)

    def evaluate(self, cfg: MultiheadPipeline, prepared, net, dist) -> tuple[dict, list[tuple]]:
        import torch

        from ratchet.evaluate.metrics import test_metrics
        from ratchet.evaluate.report import metrics_dict
        from ratchet.train.distributed import all_gather_objects, all_reduce_sum
        from ratchet.train.loader import BatchLoader

        meta, heads = prepared.meta, list(cfg.model.heads)
        _, transform = self.transforms(cfg, meta, dist.device)
        loader = BatchLoader(self.samples(cfg, prepared, "test"), cfg.evaluate.batch_size, dist, train=False,
                             transform=transform)
        sizes = _outputs(meta)
        metrics = {head: test_metrics(sizes[head], dist.device) for head in heads}
        loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
        totals = torch.zeros(len(heads) + 1, device=dist.device)  # summed loss per head, then the count
        local: list[tuple] = []
        with torch.no_grad():
            for idx, (inputs, targets) in loader.iter_with_indices():
                outputs = {head: logits.float() for head, logits in net(inputs).items()}
                for i, head in enumerate(heads):
                    metrics[head].update(outputs[head], targets[head])
                    totals[i] += loss_fn(outputs[head], targets[head])
                totals[-1] += len(idx)
                local += zip(idx.tolist(), *(outputs[head].argmax(dim=1).tolist() for head in heads))
        all_reduce_sum(totals)
        values = {head: metrics[head].compute() for head in heads}  # collectives: every process calls them
        predictions = sorted(p for part in all_gather_objects(local) for p in part)
        losses = (totals[:-1] / totals[-1]).tolist()
        names = _names(meta)
        per_head = {head: metrics_dict(values[head], names[head], losses[i]) for i, head in enumerate(heads)}
        out: dict = {"loss": sum(cfg.model.heads[h] * losses[i] for i, h in enumerate(heads)),
                     "samples": int(totals[-1].item())}
        for head, report in per_head.items():
            out.update({f"{head}.{k}": v for k, v in report.items() if isinstance(v, float) and k != "loss"})
            out[f"{head}.loss"] = report["loss"]
        out["heads"] = per_head
        return out, predictions

    def write_report(self, name: str, cfg: MultiheadPipeline, prepared, metrics: dict, predictions: list[tuple],
                     out: Path) -> None:
        """Per head: classification report (txt, json), the confusion matrix (a PNG up to
        MATRIX_PNG_LIMIT classes; above, confusion_matrix_<head>.csv and the most confused pairs
        in the report), and for the class head the accuracy within each group."""
        from ratchet.evaluate.heads import group_accuracy, most_confused
        from ratchet.evaluate.plots import confusion_matrix_png
        from ratchet.evaluate.report import report_text

        meta, heads = prepared.meta, list(cfg.model.heads)
        names = _names(meta)
        y = np.asarray(prepared.array("test_y"))
        actual = {"class": y, "group": np.asarray(meta.class_group, dtype=np.int64)[y]}
        ids = prepared.array("test_ids")
        rows = np.array([p[0] for p in predictions], dtype=np.int64)
        predicted = {head: np.array([p[1 + i] for p in predictions], dtype=np.int64) for i, head in enumerate(heads)}
        with open(out / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([meta.id, *(f"{kind}_{head}" for head in heads for kind in ("actual", "predicted"))])
            for j, i in enumerate(rows):
                writer.writerow([ids[i].item(), *(names[h][v] for h in heads
                                                  for v in (actual[h][i], predicted[h][j]))])
        for head in heads:
            report = metrics["heads"][head]
            n = len(names[head])
            confusion = np.zeros((n, n), dtype=np.int64)
            np.add.at(confusion, (actual[head][rows], predicted[head]), 1)
            text = f"head {head} ({n} classes)\n\n" + report_text(report)
            if head == "class":
                text += "\n" + group_accuracy(confusion, meta.groups, meta.class_group)
            if n <= MATRIX_PNG_LIMIT:
                confusion_matrix_png(confusion.tolist(), names[head], out / f"confusion_matrix_{head}.png",
                                     f"{name}: test confusion matrix, {head} head")
            else:
                np.savetxt(out / f"confusion_matrix_{head}.csv", confusion, fmt="%d", delimiter=",",
                           header=",".join(names[head]), comments="")
                text += "\n" + most_confused(confusion, names[head], MOST_CONFUSED)
            (out / f"classification_report_{head}.txt").write_text(text)
            (out / f"classification_report_{head}.json").write_text(json.dumps(report["per_class"], indent=2) + "\n")

    def summary(self, metrics: dict) -> str:
        heads = ", ".join(f"{head} accuracy {metrics[f'{head}.accuracy']:.4f}, f1_macro {metrics[f'{head}.f1_macro']:.4f}"
                          for head in metrics["heads"])
        return f"{heads} on {metrics['samples']} test samples"

    def serving_model(self, cfg: MultiheadPipeline, net, meta: MultiheadMeta):
        from ratchet.models.multihead import ServedMultiHead
        from ratchet.models.serving import ImagePreprocess

        return ServedMultiHead(net, cfg.model.inputs, ImagePreprocess(meta.mean, meta.std)).eval()

    def example_input(self, cfg: MultiheadPipeline, meta: MultiheadMeta) -> dict:
        """The image family's two images, and the first and last group."""
        example = {"image": super().example_input(cfg, meta), "group": np.array([0, len(meta.groups) - 1], np.int64)}
        return {key: example[key] for key in cfg.model.inputs}

    def input_description(self, cfg: MultiheadPipeline, meta: MultiheadMeta) -> str:
        c, h, w = meta.input_shape
        return (f"inputs: {', '.join(cfg.model.inputs)}; images: uint8 {c}x{h}x{w} ({meta.channels}); "
                f"heads: {', '.join(cfg.model.heads)}; groups: {', '.join(meta.groups)}; "
                f"classes: {', '.join(meta.classes)}")

    def serving_spec(self, cfg: MultiheadPipeline, meta: MultiheadMeta) -> dict:
        return {**super().serving_spec(cfg, meta), "groups": meta.groups, "inputs": list(cfg.model.inputs),
                "heads": sorted(cfg.model.heads, key=HEADS.index)}

    def serving_signature(self, spec: dict) -> tuple:
        """Inputs `image` (and `group`, a group name); per head `<head>_label`, `<head>_probability`,
        `<head>_prob_<name>`."""
        from mlflow.types import ColSpec, Schema

        from ratchet.serve.frames import class_schema

        names = {"class": spec["classes"], "group": spec["groups"]}
        return (Schema([ColSpec("string", key) for key in spec["inputs"]]),
                Schema([col for head in spec["heads"] for col in class_schema(names[head], f"{head}_")]))

    def serving_example(self, spec: dict, cfg, meta: MultiheadMeta):
        frame = super().serving_example(spec, cfg, meta)
        return frame.assign(group=[meta.groups[0], meta.groups[-1]]) if "group" in spec["inputs"] else frame

    def frame_inputs(self, spec: dict, frame) -> tuple:
        from ratchet.errors import RatchetError

        (image,) = super().frame_inputs(spec, frame)
        if "group" not in spec["inputs"]:
            return (image,)
        if "group" not in frame.columns:
            raise RatchetError("column 'group' not found (the model takes each image's group name)")
        index = {name: i for i, name in enumerate(spec["groups"])}
        group = frame["group"].astype(str).map(index)
        if group.isna().any():
            i = int(np.argmax(group.isna().to_numpy()))
            raise RatchetError(f"column 'group', {frame.index.name or 'row'} {frame.index[i]}: "
                               f"{frame['group'].iloc[i]!r} is not a group the model knows "
                               f"({', '.join(spec['groups'][:5])}{', ...' if len(spec['groups']) > 5 else ''})")
        return image, group.to_numpy(dtype=np.int64)

    def frame_outputs(self, spec: dict, outputs: dict, frame):
        import pandas as pd

        from ratchet.serve.frames import class_columns

        names = {"class": spec["classes"], "group": spec["groups"]}
        columns = {}
        for head in spec["heads"]:
            columns.update(class_columns(outputs[head], names[head], f"{head}_"))
        return pd.DataFrame(columns, index=frame.index)

    def read_input(self, spec: dict, path):
        """The image family's files; with a group input, each image's group is the nearest folder
        above it named after a group (`<group>/<image>` or `<group>/<class>/<image>`)."""
        from ratchet.errors import RatchetError

        frame, notes = super().read_input(spec, path)
        if "group" not in spec["inputs"]:
            return frame, notes
        known = set(spec["groups"])
        groups = []
        for name in frame.index:
            file = Path(path) / name if Path(path).is_dir() else Path(path)
            found = next((part for part in reversed(file.resolve().parent.parts) if part in known), None)
            if found is None:
                raise RatchetError(f"{file}: no folder named after a group "
                                   f"above it; the model takes image and group: put images under <group>/ folders "
                                   f"(groups: {', '.join(spec['groups'][:5])}{', ...' if len(known) > 5 else ''})")
            groups.append(found)
        return frame.assign(group=groups), notes

    def gate_data(self, cfg: MultiheadPipeline, prepared) -> tuple:
        return self.samples(cfg, prepared, "test")

    def score(self, cfg: MultiheadPipeline, model, meta: MultiheadMeta, x: dict, y: dict, metric: str) -> float:
        import torch

        from ratchet.evaluate.metrics import test_metrics
        from ratchet.train.batch import chunks

        head, name = metric.split(".", 1)
        metrics = test_metrics(_outputs(meta)[head], torch.device("cpu"))
        for inputs, targets in chunks(x, y):  # the served model takes its inputs positionally, in order
            metrics.update(model(*inputs.values())[head], targets[head])
        return float(metrics.compute()[name])


def _balanced_weights(cfg: MultiheadPipeline, meta: MultiheadMeta) -> dict[str, list[float]] | None:
    """`train.class_weights: balanced` per head: n / (classes x count) of the class head's classes,
    and of the groups (each group counting the training samples of its classes)."""
    if cfg.train.class_weights == "none":
        return None
    classes = np.array(meta.class_counts["train"], dtype=np.float64)
    groups = np.bincount(meta.class_group, weights=classes, minlength=len(meta.groups))
    return {head: (c.sum() / (len(c) * c)).tolist() for head, c in (("class", classes), ("group", groups))}


def _outputs(meta: MultiheadMeta) -> dict[str, int]:
    return {"class": len(meta.classes), "group": len(meta.groups)}


def _names(meta: MultiheadMeta) -> dict[str, list[str]]:
    return {"class": meta.classes, "group": meta.groups}


FAMILY = MultiheadFamily()
