"""hello-pt-mlflow as a training script: SimpleNetwork on CIFAR-10, logged with MLflow's calls.

train_plain.py is a plain PyTorch script (`python train_plain.py --rounds 5`, logging to MLflow itself);
train.py is the same script federated with fedstream.client, which every site of the job runs: compare them
with `diff train_plain.py train.py`.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from fedstream import client as fl, mlflow
from fedstream.examples.hello_pt import SimpleNetwork
from fedstream.pt.site_data import Cifar10Data, SiteData, batches


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train SimpleNetwork on CIFAR-10")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --epochs epochs each")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="~/.cache/fedstream/cifar10")
    parser.add_argument("--max-train-samples", type=int, default=0, help="train on at most this many (0: all)")
    parser.add_argument("--max-val-samples", type=int, default=0, help="validate on at most this many (0: all)")
    parser.add_argument("--shard", type=int, default=0, help="train on this shard of the data (from 0) ...")
    parser.add_argument("--num-shards", type=int, default=1, help="... of this many")
    return parser.parse_args()


def load_data(args: argparse.Namespace) -> SiteData:
    data = Cifar10Data(
        root=args.data_root,
        seed=args.seed,
        max_train_samples=args.max_train_samples,
        max_val_samples=args.max_val_samples,
    )
    return data.for_site(args.shard, args.num_shards)


def train(model: torch.nn.Module, data: SiteData, args: argparse.Namespace, round: int) -> tuple[int, dict]:
    """--epochs epochs of SGD with momentum; logs every batch's loss and each epoch's validation accuracy."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    rng = np.random.default_rng([args.seed, args.shard, round])
    split = data.train()
    steps_per_round = args.epochs * -(-len(split.labels) // args.batch_size)
    step = (round - 1) * steps_per_round
    for _ in range(args.epochs):
        model.train()
        running_loss, seen = 0.0, 0
        for x, y in batches(split, args.batch_size, shuffle=rng):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            running_loss, seen = running_loss + loss.item(), seen + 1
            mlflow.log_metrics({"train_loss": loss.item(), "running_loss": running_loss / seen}, step=step)
            step += 1
        mlflow.log_metric("validation_accuracy", evaluate(model, data, 1000)[1]["accuracy"], step=step)
    return len(split.labels), {"train_loss": running_loss / max(seen, 1)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: SiteData, max_samples: int = 0) -> tuple[int, dict]:
    """Accuracy and mean loss on the validation samples (the first max_samples of them if not 0)."""
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in batches(data.validation(max_samples), 500):
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == y).sum())
        total += len(y)
    return total, {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1)}


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    model = SimpleNetwork()
    data = load_data(args)
    mlflow.log_params({"learning_rate": args.lr, "batch_size": args.batch_size, "epochs": args.epochs})
    fl.init()
    while fl.running():
        task = fl.receive()
        model.load_state_dict(task.weights)
        samples, metrics = train(model, data, args, task.round) if task.is_train else evaluate(model, data)
        fl.send(model.state_dict(), num_samples=samples, metrics=metrics)
    print("last round:", metrics, "validation:", evaluate(model, data))


if __name__ == "__main__":
    main()
