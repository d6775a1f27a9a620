"""Image benchmarks, side by side in one run (ratios: these machines are noisy).

    .venv/bin/python benchmarks/bench_image.py --root ../shared/data/clouds/clouds_train

1. Epoch time on the clouds training tree: Ratchet's trainer (images decoded once by the
   prepare stage into uint8 arrays; per-batch augmentation on tensors) against the course's
   plain loop (torchvision ImageFolder decoding every JPEG every epoch, PIL transforms per
   image: RandomHorizontalFlip, RandomRotation(45), RandomAutocontrast, ToTensor,
   Resize(64x64); DataLoader; the course's CNN as written there, Adam, the same batch size and
   augmentation). Ratchet's `cnn` computes the same function (it pools before the activation,
   which commutes with max-pooling, and runs channels-last).
   Rounds alternate between the two; medians are reported. The one-off prepare (decode) time is
   reported beside it.
2. No framework tax: the trainer's epochs against a hand-optimised raw loop over the same uint8
   arrays resident on the device (common.raw_epochs: one `index_select` per batch, the same
   augmentation written out in plain torch, the same network, channels-last, fused Adam); goal
   >= 0.97. Rounds alternate between all three sides.
3. The same training step on one fixed batch already on the device (`--device cuda` on a GPU):
   an upper bound for the pipeline, and the ratio of the pipeline's images/s to it (goal on a GPU
   >= 0.8), with the raw loop's and the course loop's ratios beside it.
The last line is a JSON object of the ratios (benchmarks/gpu.sh collects it on a GPU machine).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
import yaml
from common import alternate, print_json, raw_epochs, raw_optimizer, set_threads
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from ratchet.config import AugmentConfig, CNNConfig, TrainConfig, load_params
from ratchet.data.transforms import BatchAugment, Compose, Normalize, ToUnitFloat
from ratchet.families import get_family
from ratchet.evaluate.metrics import validation_metrics
from ratchet.models.cnn import CNN
from ratchet.stages import prepare
from ratchet.train.distributed import DistInfo
from ratchet.train.loader import BatchLoader
from ratchet.train.optim import build_optimizer
from ratchet.train.trainer import Trainer

MODEL = CNNConfig(name="cnn", channels=[32, 64], activation="elu", init="default")  # the course's cloud net
AUGMENT = AugmentConfig(hflip=0.5, rotation=45, autocontrast=0.5)  # the course's three random transforms
SIZE = 64


class CourseNet(nn.Module):
    """The course's cloud classifier, as written there: conv-ELU-maxpool twice, then Linear."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=3, padding=1), nn.ELU(), nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.ELU(), nn.MaxPool2d(kernel_size=2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64 * (SIZE // 4) * (SIZE // 4), num_classes)

    def forward(self, x):
        return self.classifier(self.feature_extractor(x))


def course_loop(root: Path, batch_size: int, epochs: int, device: torch.device) -> list[float]:
    """The course's training loop, as written there; seconds per epoch."""
    train_transforms = transforms.Compose([
        transforms.RandomHorizontalFlip(),
        transforms.RandomRotation(45),
        transforms.RandomAutocontrast(),
        transforms.ToTensor(),
        transforms.Resize((SIZE, SIZE)),
    ])
    dataset = datasets.ImageFolder(str(root), transform=train_transforms)
    loader = DataLoader(dataset, shuffle=True, batch_size=batch_size)
    torch.manual_seed(0)
    net = CourseNet(len(dataset.classes)).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.001)
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        net.train()
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = net(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def ratchet_trainer(prepared, batch_size: int, dist: DistInfo) -> Trainer:
    meta = prepared.meta
    torch.manual_seed(0)
    net = CNN(meta.input_shape, len(meta.classes), MODEL).to(dist.device, memory_format=get_family("image").memory_format(meta))
    cfg = TrainConfig(out_dir="unused", checkpoint="unused", epochs=1, batch_size=batch_size, device=dist.device.type,
                      amp=False)
    normalize = Normalize(meta.mean, meta.std)
    augment = Compose(ToUnitFloat(), BatchAugment(AUGMENT, 0, dist.device), normalize)
    x, y = prepared.split("train")
    loader = BatchLoader([np.concatenate([x, prepared.array("val_x")]), np.concatenate([y, prepared.array("val_y")])],
                         batch_size, dist, train=True, seed=0, transform=augment)
    val = BatchLoader(prepared.split("val"), 512, dist, train=False, transform=Compose(ToUnitFloat(), normalize))
    return Trainer(net, build_optimizer(cfg.optimizer, net), None, nn.CrossEntropyLoss(), loader, val,
                   validation_metrics(len(meta.classes), dist.device), dist, cfg)


def ratchet_epochs(trainer: Trainer, epochs: int) -> list[float]:
    times = []
    gc.collect()  # as the raw loop does
    for epoch in range(epochs):
        started = time.perf_counter()
        trainer._run_epoch(epoch)  # a training epoch, no validation: like for like with the course loop
        if trainer.dist.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def raw_augment(mean: list[float], std: list[float], device: torch.device):
    """The course's augmentation on a uint8 batch, written out in plain torch for these square
    images: [0, 1] floats, a flip with p 0.5, a rotation in [-45, 45] degrees (bilinear, zeros
    fill), autocontrast with p 0.5, then normalisation, channels-last."""
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean, std))

    def augment(x8: torch.Tensor) -> torch.Tensor:
        n = len(x8)
        x = x8.float().div_(255)
        x = torch.where(torch.rand(n, 1, 1, 1, device=device) < AUGMENT.hflip, x.flip(-1), x)
        angle = (torch.rand(n, device=device) * 2 - 1) * math.radians(AUGMENT.rotation)
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros(n, device=device)
        theta = torch.stack([cos, sin, zero, -sin, cos, zero], dim=1).view(n, 2, 3)  # the inverse rotation
        x = nnf.grid_sample(x, nnf.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
        low, high = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
        flat = high == low
        stretched = ((x - torch.where(flat, 0.0, low)) / torch.where(flat, 1.0, high - low)).clamp_(0, 1)
        x = torch.where(torch.rand(n, 1, 1, 1, device=device) < AUGMENT.autocontrast, stretched, x)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    return augment


class RawLoop:
    """The raw side: its own copy of the network and optimizer, the training arrays on the device."""

    def __init__(self, prepared, batch_size: int, device: torch.device):
        meta = prepared.meta
        torch.manual_seed(0)
        self.net = CNN(meta.input_shape, len(meta.classes), MODEL).to(device, memory_format=torch.channels_last)
        self.optimizer = raw_optimizer(self.net)
        x, y = prepared.split("train")
        self.x = torch.from_numpy(np.concatenate([x, prepared.array("val_x")])).to(device)  # uint8
        self.y = torch.from_numpy(np.concatenate([y, prepared.array("val_y")])).to(device)
        self.augment = raw_augment(meta.mean, meta.std, device)
        self.batch_size = batch_size

    def epochs(self, epochs: int) -> list[float]:
        return raw_epochs(self.net, self.optimizer, nn.CrossEntropyLoss(), self.x, self.y, self.batch_size, epochs,
                          augment=self.augment)


def prepare_clouds(root: Path, work: Path) -> tuple[object, float]:
    """Run the real prepare stage on the tree (all images used for training: val fraction tiny)."""
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    section = params["pipelines"]["image"]
    section["data"] = {"source": str(root), "channels": "rgb", "size": [SIZE, SIZE]}
    section["prepare"] = {"out_dir": str(work / "prepared"), "val_fraction": 0.02, "test_fraction": 0.02}
    section["model"] = {"name": "cnn"}
    (work / "params.yaml").write_text(yaml.safe_dump({"pipelines": {"image": section}}))
    started = time.perf_counter()
    prepare.run(load_params(work / "params.yaml"), "image")
    return get_family("image").load(work / "prepared"), time.perf_counter() - started


def step_ceiling(trainer: Trainer, batch_size: int, steps: int) -> float:
    """Images/s of the same training step on one fixed, already augmented and normalised batch
    resident on the device: what the pipeline would reach if data cost nothing."""
    sync = torch.cuda.synchronize if trainer.dist.device.type == "cuda" else (lambda: None)
    trainer.module.train()
    inputs, targets = next(iter(trainer.train_loader))
    for _ in range(5):
        trainer._run_batch(inputs, targets)
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        trainer._run_batch(inputs, targets)
    sync()
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/clouds/clouds_train"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads, all sides alike (0: torch's)")
    args = parser.parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    dist = DistInfo(0, 0, 1, device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))

    with tempfile.TemporaryDirectory() as tmp:
        prepared, prepare_seconds = prepare_clouds(args.root.resolve(), Path(tmp))
        n = sum(prepared.meta.rows.values()) - prepared.meta.rows["test"]
        print(f"prepare (decode {n + prepared.meta.rows['test']} images once, resize to {SIZE}x{SIZE}): "
              f"{prepare_seconds:.2f} s")
        trainer = ratchet_trainer(prepared, args.batch_size, dist)
        raw = RawLoop(prepared, args.batch_size, device)
        course_loop(args.root, args.batch_size, 1, device)  # warm-up: file cache, kernels
        ratchet_epochs(trainer, 1)
        raw.epochs(1)
        rounds = alternate({"course": lambda: course_loop(args.root, args.batch_size, args.epochs, device),
                            "ratchet": lambda: ratchet_epochs(trainer, args.epochs),
                            "raw": lambda: raw.epochs(args.epochs)}, args.rounds, warmup=False)
        c, o, w = (statistics.median(t for r in rounds[side] for t in r) for side in ("course", "ratchet", "raw"))
        paired = statistics.median(statistics.median(a) / statistics.median(b)
                                   for a, b in zip(rounds["raw"], rounds["ratchet"]))
        total = len(datasets.ImageFolder(str(args.root)))
        print(f"\nclouds train tree, batch {args.batch_size}, course CNN at {SIZE}x{SIZE}, augmentation "
              f"flip+rotate(45)+autocontrast; median of {args.rounds} alternating rounds x {args.epochs} epochs")
        print(f"{'':<26}{'images':>8}{'s/epoch':>10}{'images/s':>12}")
        print(f"{'course loop (ImageFolder)':<26}{total:>8}{c:>10.3f}{total / c:>12.0f}")
        print(f"{'ratchet trainer':<26}{n:>8}{o:>10.3f}{n / o:>12.0f}")
        print(f"{'raw loop (uint8 arrays)':<26}{n:>8}{w:>10.3f}{n / w:>12.0f}")
        print(f"ratio (images/s, ratchet / course): {(n / o) / (total / c):.2f}x")
        print(f"ratio (images/s, ratchet / raw loop): {w / o:.3f} (median of per-round ratios {paired:.3f})")
        ceiling = step_ceiling(trainer, args.batch_size, 200 if device.type == "cuda" else 60)
        print(f"training step alone on a fixed {device.type}-resident batch: {ceiling:.0f} images/s; "
              f"pipeline / step-alone: {n / o / ceiling:.2f}, raw loop / step-alone: {n / w / ceiling:.2f}, "
              f"course loop / step-alone: {total / c / ceiling:.2f}")
    print_json({"device": device.type, "batch": args.batch_size, "trainer_vs_raw": w / o,
                "trainer_vs_raw_paired": paired, "trainer_vs_course": (n / o) / (total / c), "pipeline_vs_step": n / o / ceiling,
                "raw_vs_step": n / w / ceiling, "course_vs_step": total / c / ceiling})


if __name__ == "__main__":
    main()
