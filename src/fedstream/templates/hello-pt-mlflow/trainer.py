"""hello-pt with MLflow-style tracking: the calls a user adds to a trainer, nothing else.

Nothing here talks to MLflow: every call becomes an event that the site streams to the server, which alone
writes it to MLflow (and to TensorBoard files).
"""

from fedstream import TaskInfo, TrainOutput
from fedstream.examples.hello_pt import HelloPTTrainer
from fedstream.tracking import MLflowWriter


class MLflowHelloPT(HelloPTTrainer):
    """Logs ``train_loss`` and ``running_loss`` every batch, ``validation_accuracy`` every epoch, a note
    every round, its hyper-parameters as params and a ``site`` tag."""

    def setup(self) -> None:
        super().setup()
        self.writer = MLflowWriter()
        self.writer.log_params(
            {
                "learning_rate": self.lr,
                "momentum": 0.9,
                "batch_size": self.batch_size,
                "epochs": self.epochs,
                "loss": "CrossEntropyLoss",
            }
        )
        self.writer.set_tag("data", f"CIFAR-10, {len(self.data.train_indices)} training samples")

    def on_batch(self, task: TaskInfo, step: int, loss: float, running_loss: float) -> None:
        global_step = task.global_step(step, self.steps_per_round)
        self.writer.log_metrics({"train_loss": loss, "running_loss": running_loss}, step=global_step)

    def on_epoch_end(self, task: TaskInfo, epoch: int, step: int) -> None:
        accuracy, _ = self.evaluate(max_samples=1000)  # a quick estimate; each round validates on all
        self.writer.log_metric("validation_accuracy", accuracy, step=task.global_step(step, self.steps_per_round))

    def on_train_end(self, task: TaskInfo, output: TrainOutput) -> None:
        self.writer.log_text(
            f"round {task.round}: trained on {output.num_samples} samples, last epoch's loss "
            f"{output.metrics['train_loss']:.4f}; running_loss restarts every epoch\n",
            f"notes/round_{task.round}.txt",
        )
