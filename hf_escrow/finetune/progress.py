"""Training progress for people: a rich progress bar driven by the Trainer's callbacks."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback


def quiet_training_logs() -> None:
    """Training libraries log a lot (load reports, per-map bars); callers show their own progress."""
    import warnings

    import datasets
    import transformers
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


class RichProgress(TrainerCallback):
    """Steps done / total, loss, elapsed and remaining time, on a rich console."""

    def __init__(self, console: Console | None = None, description: str = "training"):
        self.console = console or Console(stderr=True)
        self.description = description
        self._progress: Progress | None = None
        self._task = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=self.console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=state.max_steps or None, loss="-")

    def on_step_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._progress is not None and logs and "loss" in logs:
            self._progress.update(self._task, loss=f"{float(logs['loss']):.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step)
            self._progress.stop()
            self._progress = None


class Limits(TrainerCallback):
    """Stop training at the buyer's step and wall-clock limits (the run is then evaluated as it is)."""

    def __init__(self, max_steps: int, max_wall_seconds: float):
        self.max_steps = max_steps
        self.max_wall_seconds = max_wall_seconds
        self.started = time.monotonic()
        self.stopped_by: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.max_steps:
            self.stopped_by = "max_steps"
            control.should_training_stop = True
        elif time.monotonic() - self.started >= self.max_wall_seconds:
            self.stopped_by = "max_wall_seconds"
            control.should_training_stop = True
        return control


class Stages(TrainerCallback):
    """At each evaluation (every `stage_steps`, and the last): snapshot the adapter and hand the
    stage to `on_stage`; a true answer stops training (nothing left to earn)."""

    def __init__(self, on_stage, snapshot, metric: str):
        self.on_stage = on_stage
        self.snapshot = snapshot          # (model, step, score) -> the Stage, its adapter saved
        self.metric = metric
        self.seen: set[int] = set()

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        key = f"eval_{self.metric}"
        if metrics is None or key not in metrics or state.global_step in self.seen:
            return control
        self.seen.add(state.global_step)
        if self.on_stage(self.snapshot(model, state.global_step, float(metrics[key]))):
            control.should_training_stop = True
        return control
