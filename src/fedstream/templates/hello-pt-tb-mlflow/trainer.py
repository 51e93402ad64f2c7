"""hello-pt with TensorBoard-style tracking (``add_scalar``), streamed to the server's MLflow and TensorBoard."""

from fedstream import TaskInfo, TrainOutput
from fedstream.examples.hello_pt import HelloPTTrainer
from fedstream.tracking import SummaryWriter


class TensorBoardHelloPT(HelloPTTrainer):
    """The same tracking as hello-pt-mlflow, written the TensorBoard way."""

    def setup(self) -> None:
        super().setup()
        self.writer = SummaryWriter()
        self.writer.add_hparams(
            {"learning_rate": self.lr, "momentum": 0.9, "batch_size": self.batch_size, "epochs": self.epochs}, {}
        )
        self.writer.add_text("site", self.site.name)

    def on_batch(self, task: TaskInfo, step: int, loss: float, running_loss: float) -> None:
        global_step = task.global_step(step, self.steps_per_round)
        self.writer.add_scalar("train_loss", loss, global_step)
        self.writer.add_scalar("running_loss", running_loss, global_step)

    def on_epoch_end(self, task: TaskInfo, epoch: int, step: int) -> None:
        accuracy, _ = self.evaluate(max_samples=1000)  # a quick estimate; each round validates on all
        self.writer.add_scalar("validation_accuracy", accuracy, task.global_step(step, self.steps_per_round))

    def on_train_end(self, task: TaskInfo, output: TrainOutput) -> None:
        self.writer.add_text("notes", f"round {task.round}: loss {output.metrics['train_loss']:.4f}", task.round)
