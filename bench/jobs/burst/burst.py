"""A trainer that logs COUNT metrics as fast as it can and records what each log_metric call cost."""

import json
import time

import numpy as np
import torch

from fedstream import Trainer, TrainOutput, ValidationOutput
from fedstream.tracking import MLflowWriter


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


class BurstTrainer(Trainer):
    def __init__(self, *, count: int = 100_000) -> None:
        self.count = count

    def train(self, task):
        writer = MLflowWriter()
        costs = np.empty(self.count, dtype=np.int64)
        clock = time.perf_counter_ns
        began = time.time()
        for i in range(self.count):
            start = clock()
            writer.log_metric("burst", float(i), step=i)
            costs[i] = clock() - start
        calls = {
            "began": began,
            "seconds": time.time() - began,
            "p50_us": float(np.percentile(costs, 50)) / 1000,
            "p99_us": float(np.percentile(costs, 99)) / 1000,
            "mean_us": float(costs.mean()) / 1000,
        }
        (self.site.workspace / "log_metric_cost.json").write_text(json.dumps(calls))
        return TrainOutput(num_samples=1)

    def validate(self, task):
        return ValidationOutput(num_samples=1, metrics={"accuracy": 1.0})
