"""The hello-pt reference job: a small CNN trained on CIFAR-10 at every site.

:class:`HelloPTTrainer` has hook methods (``on_train_start``, ``on_batch``, ``on_epoch_end``,
``on_train_end``) that do nothing here; the tracking jobs subclass it and log from them.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedstream.pt.algorithms import FEDPROX_MU, SCAFFOLD_C, SCAFFOLD_DELTA_C, ProximalTerm, ScaffoldState
from fedstream.pt.site_data import Cifar10Data, SiteData, batches
from fedstream.pt.trainer import TaskInfo, Trainer, TrainOutput, ValidationOutput

MOMENTUM = 0.9
"""The SGD momentum of the hello-pt trainers."""


class SimpleNetwork(nn.Module):
    """conv 3->6 k5, max-pool 2, conv 6->16 k5, max-pool 2, fc 400->120->84->10, ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        logits: torch.Tensor = self.fc3(x)
        return logits


class HelloPTTrainer(Trainer):
    """CrossEntropyLoss and SGD with momentum 0.9 on the site's share of CIFAR-10; it follows FedProx's and
    SCAFFOLD's workflows when the job runs them (:mod:`fedstream.pt.algorithms`).

    Args:
        epochs: local epochs per round.
        batch_size: training mini-batch size.
        lr: SGD learning rate.
        eval_batch_size: mini-batch size for validation (no gradients, so larger is faster).
        device: ``cpu``, ``cuda`` or ``auto`` (cuda when available).
        data: which part of CIFAR-10 this site trains and validates on.
        lr_schedule: ``constant``, or ``cosine``: the learning rate falls from ``lr`` to 0 along a cosine over
            the whole job (every round's steps, as ``task.num_rounds`` says).
        augment: random crops (4 pixels of zero padding) and horizontal flips of the training images.
        weight_decay: SGD's L2 weight decay.
    """

    def __init__(
        self,
        *,
        epochs: int = 1,
        batch_size: int = 32,
        lr: float = 0.01,
        eval_batch_size: int = 500,
        device: str = "cpu",
        data: Cifar10Data = Cifar10Data(),  # noqa: B008 - immutable settings
        lr_schedule: Literal["constant", "cosine"] = "constant",
        augment: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        for name, value in (("epochs", epochs), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be 0 or more, got {weight_decay}")
        if device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.lr_schedule = lr_schedule
        self.augment = augment
        self.weight_decay = weight_decay
        self.eval_batch_size = eval_batch_size
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.data_config = data
        self.loss = nn.CrossEntropyLoss()
        self.scaffold = ScaffoldState()  # this site's control variate, used when the workflow is SCAFFOLD

    def setup(self) -> None:
        self.data: SiteData = self.data_config.for_site(self.site.index, self.site.num_sites)
        self.model.to(self.device)
        self.site.log.info(
            "%d training and %d validation samples", len(self.data.train_indices), len(self.data.validation_indices)
        )

    @property
    def steps_per_round(self) -> int:
        return self.epochs * -(-len(self.data.train_indices) // self.batch_size)

    def learning_rate(self, task: TaskInfo, step: int) -> float:
        """The learning rate of ``step`` (from 0) of ``task``'s round."""
        if self.lr_schedule == "constant":
            return self.lr
        done = task.global_step(step, self.steps_per_round) / (task.num_rounds * self.steps_per_round)
        return self.lr * 0.5 * (1 + math.cos(math.pi * done))

    def train(self, task: TaskInfo) -> TrainOutput:
        optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        rng = np.random.default_rng([self.data_config.seed, self.site.index, task.round])
        train = self.data.train()
        prox = ProximalTerm(self.model, task.config.get(FEDPROX_MU, 0.0))
        correction = self.scaffold.start(self.model, task.extra) if SCAFFOLD_C in task.extra else None
        self.on_train_start(task)
        step = 0
        epoch_loss = 0.0
        lr_sum = 0.0
        for epoch in range(self.epochs):
            self.model.train()  # hooks may have evaluated the model in between
            running_loss, seen = 0.0, 0
            for x, y in batches(train, self.batch_size, shuffle=rng):
                if self.lr_schedule != "constant":
                    for group in optimizer.param_groups:
                        group["lr"] = self.learning_rate(task, step)
                lr_sum += optimizer.param_groups[0]["lr"]
                optimizer.zero_grad()
                x = augment(x, rng) if self.augment else x
                cost = self.loss(self.model(x.to(self.device)), y.to(self.device))
                (cost + prox() if prox.mu else cost).backward()  # FedAvg's step stays as it was
                if correction is not None:
                    correction.apply()
                optimizer.step()
                loss = cost.item()
                running_loss += loss
                seen += 1
                self.on_batch(task, step, loss, running_loss / seen)
                step += 1
            epoch_loss = running_loss / max(seen, 1)
            self.on_epoch_end(task, epoch, step)
        # SCAFFOLD's option II divides the round's displacement by the steps' total step size; momentum 0.9
        # makes each step about 1 / (1 - 0.9) times its learning rate
        step_size = lr_sum / max(step, 1) / (1 - MOMENTUM)
        extra = {SCAFFOLD_DELTA_C: correction.finish(step, step_size)} if correction is not None else {}
        output = TrainOutput(num_samples=len(train.labels), metrics={"train_loss": epoch_loss}, extra=extra)
        self.on_train_end(task, output)
        return output

    def validate(self, task: TaskInfo) -> ValidationOutput:
        accuracy, loss = self.evaluate()
        return ValidationOutput(
            num_samples=len(self.data.validation_indices), metrics={"accuracy": accuracy, "loss": loss}
        )

    @torch.no_grad()
    def evaluate(self, max_samples: int = 0) -> tuple[float, float]:
        """Accuracy and mean loss of the current model on the site's validation samples (the first
        ``max_samples`` of them if that is not 0)."""
        self.model.eval()
        correct, total, loss_sum = 0, 0, 0.0
        for x, y in batches(self.data.validation(max_samples), self.eval_batch_size):
            logits = self.model(x.to(self.device))
            y = y.to(self.device)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == y).sum())
            total += len(y)
        return correct / max(total, 1), loss_sum / max(total, 1)

    # Hooks for subclasses that log; ``step`` counts batches within the round, from 0.
    def on_train_start(self, task: TaskInfo) -> None:
        """Called before the first batch of a round."""

    def on_batch(self, task: TaskInfo, step: int, loss: float, running_loss: float) -> None:
        """Called after every training batch."""

    def on_epoch_end(self, task: TaskInfo, epoch: int, step: int) -> None:
        """Called after every local epoch; ``step`` batches have been trained this round."""

    def on_train_end(self, task: TaskInfo, output: TrainOutput) -> None:
        """Called after the last epoch of a round."""


def augment(x: torch.Tensor, rng: np.random.Generator, padding: int = 4) -> torch.Tensor:
    """Each image of the batch ``x`` (N, C, H, W) cropped at a random offset from its zero-padded copy and
    flipped left-right half of the time."""
    count, _, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = rng.integers(0, 2 * padding + 1, count)
    columns = rng.integers(0, 2 * padding + 1, count)
    flips = rng.random(count) < 0.5
    out = torch.empty_like(x)
    for i in range(count):
        crop = padded[i, :, rows[i] : rows[i] + height, columns[i] : columns[i] + width]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


class ConvNet(nn.Module):
    """A stronger CNN than :class:`SimpleNetwork` that still trains on a CPU: three 3x3 conv blocks
    (32, 64, 64 channels, ReLU, max-pool 2) and fc 1024->128->10, about 10 times SimpleNetwork's compute."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits
