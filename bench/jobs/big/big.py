"""A model of a given size and a trainer that returns it unchanged."""

import torch

from fedstream import Trainer, TrainOutput, ValidationOutput


class Big(torch.nn.Module):
    def __init__(self, size_mib: int = 256) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(size_mib * 2**20 // 4))


class Idle(Trainer):
    def train(self, task):
        return TrainOutput(num_samples=1)

    def validate(self, task):
        return ValidationOutput(num_samples=1, metrics={"accuracy": 1.0})
