"""The multihead family against the course's plain PyTorch, on the same files, in one run.

    .venv/bin/python benchmarks/bench_multihead.py --params params.yaml --pipeline multi_input
    .venv/bin/python benchmarks/bench_multihead.py --params params.yaml --pipeline multi_output

Run it after the pipeline has been trained and evaluated (`python -m pipelines.retrain NAME`):
it reads the pipeline's prepared split (the training and test files, after the duplicate guard)
and its metrics.json, then trains the course's network as the course writes it (a Dataset that
opens and decodes each PNG on every access, torchvision ToTensor + Resize, DataLoader with
shuffle, Adam, the pipeline's epochs, batch size and learning rate, no early stopping) on the
same training files and scores it on the same test files. Printed: test accuracy per head of
both (the question: does the pipeline learn what the course's loop learns?), and seconds per
epoch for orientation only (Ratchet's from the run's run.json, not measured side by side).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from ratchet.config import load_params
from ratchet.families import get_family


class CourseOmniglot(Dataset):
    """The course's dataset: (image, alphabet one-hot) -> (alphabet, character), decoded per access."""

    def __init__(self, files: list[Path], groups: np.ndarray, classes: np.ndarray, n_groups: int, size: int):
        self.files, self.groups, self.classes, self.n_groups = files, groups, classes, n_groups
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Resize((size, size))])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = self.transform(Image.open(self.files[i]).convert("L"))
        one_hot = torch.zeros(self.n_groups)
        one_hot[self.groups[i]] = 1.0
        return image, one_hot, int(self.groups[i]), int(self.classes[i])


class CourseNet(nn.Module):
    """The course's nets as written there: conv3x3(1->16) -> max-pool -> ELU -> flatten ->
    Linear(16*(size/2)^2 -> 128); multi-input adds Linear(alphabets -> 8) -> ELU and
    concatenates before the character layer; multi-output has an alphabet and a character layer."""

    def __init__(self, n_groups: int, n_classes: int, size: int, multi_input: bool):
        super().__init__()
        self.multi_input = multi_input
        self.image_layer = nn.Sequential(nn.Conv2d(1, 16, kernel_size=3, padding=1), nn.MaxPool2d(kernel_size=2),
                                         nn.ELU(), nn.Flatten(), nn.Linear(16 * (size // 2) ** 2, 128))
        if multi_input:
            self.alphabet_layer = nn.Sequential(nn.Linear(n_groups, 8), nn.ELU())
            self.classifier = nn.Sequential(nn.Linear(128 + 8, n_classes))
        else:
            self.classifier_alpha = nn.Linear(128, n_groups)
            self.classifier_char = nn.Linear(128, n_classes)

    def forward(self, image, alphabet):
        x = self.image_layer(image)
        if self.multi_input:
            return {"class": self.classifier(torch.cat((x, self.alphabet_layer(alphabet)), dim=1))}
        return {"group": self.classifier_alpha(x), "class": self.classifier_char(x)}


def split_files(cfg, prepared, split: str) -> tuple[list[Path], np.ndarray, np.ndarray]:
    ids = prepared.array(f"{split}_ids")
    y = np.asarray(prepared.array(f"{split}_y"))
    groups = np.asarray(prepared.meta.class_group)[y]
    return [cfg.data.source / str(i) for i in ids], groups, y


def course_run(cfg, prepared, weights: dict[str, float]) -> tuple[dict[str, float], list[float]]:
    meta, size = prepared.meta, cfg.data.size[0]
    train_set = CourseOmniglot(*split_files(cfg, prepared, "train"), len(meta.groups), size)
    test_set = CourseOmniglot(*split_files(cfg, prepared, "test"), len(meta.groups), size)
    torch.manual_seed(cfg.seed)
    net = CourseNet(len(meta.groups), len(meta.classes), size, "group" in cfg.model.inputs)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.train.optimizer.lr)
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(train_set, shuffle=True, batch_size=cfg.train.batch_size)
    seconds = []
    for _ in range(cfg.train.epochs):
        started = time.perf_counter()
        net.train()
        for image, alphabet, group, cls in loader:
            optimizer.zero_grad()
            out = net(image, alphabet)
            targets = {"group": group, "class": cls}
            loss = sum(w * criterion(out[h], targets[h]) for h, w in weights.items())
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - started)
    net.eval()
    right = {h: 0 for h in weights}
    with torch.no_grad():
        for image, alphabet, group, cls in DataLoader(test_set, batch_size=256):
            out = net(image, alphabet)
            targets = {"group": group, "class": cls}
            for h in weights:
                right[h] += int((out[h].argmax(1) == targets[h]).sum())
    return {h: right[h] / len(test_set) for h in weights}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--pipeline", default="multi_input")
    args = parser.parse_args()
    cfg = load_params(args.params).pipeline(args.pipeline)
    prepared = get_family(cfg.family).load(cfg.prepare.out_dir)
    ours = json.loads(cfg.evaluate.metrics.read_text())
    run = json.loads((cfg.train.out_dir / "run.json").read_text())
    weights = dict(cfg.model.heads)
    theirs, seconds = course_run(cfg, prepared, weights)
    rows = prepared.meta.rows
    print(f"{args.pipeline}: inputs {cfg.model.inputs}, heads {weights}, {cfg.data.size[0]}x{cfg.data.size[1]}, "
          f"train {rows['train']} files, test {rows['test']} files (duplicates {prepared.meta.duplicates}), "
          f"epochs {cfg.train.epochs}, batch {cfg.train.batch_size}, lr {cfg.train.optimizer.lr}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':<28}" + "".join(f"{h + ' accuracy':>18}" for h in weights) + f"{'s/epoch':>10}")
    ours_seconds = statistics.median(run["timings"]["epoch_seconds"])
    print(f"{'course loop (plain torch)':<28}" + "".join(f"{theirs[h]:>18.4f}" for h in weights)
          + f"{statistics.median(seconds):>10.2f}")
    best, epochs = run["metrics"]["best_epoch"], run["metrics"]["epochs"]
    print(f"{f'ratchet (best of {epochs} epochs: {best})':<28}"
          + "".join(f"{ours[h + '.accuracy']:>18.4f}" for h in weights) + f"{ours_seconds:>10.2f}")
    print("s/epoch: the course loop's measured here; Ratchet's (training and validation) from the run's "
          "run.json, at another moment: not a side-by-side speed figure (bench_image.py is)")


if __name__ == "__main__":
    main()
