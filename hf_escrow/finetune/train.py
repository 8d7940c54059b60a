"""LoRA training and evaluation with PEFT and the transformers Trainer.

`train_adapter` is the seller's side: base model + LoRA, trained on the job's training
data minus a validation split, scored on that split with the job's local `evaluate`
metric module, adapter saved and hashed. `evaluate_adapter` is the verifier's side:
the same base model with the submitted adapter, scored on data the seller never saw.
Both run the same task code, so a score means the same thing on both sides.

Two tasks:
- ``sequence-classification``: AutoModelForSequenceClassification; the metric gets
  predicted and true class ids.
- ``causal-lm``: AutoModelForCausalLM trained on prompt + completion (loss on the
  completion and its end-of-sequence token only); the metric gets the model's greedy
  continuation over the completion's tokens (teacher forcing: one forward pass, equal
  to greedy generation of that many tokens) and the completion, as text.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .artifact import adapter_files, adapter_sha256
from .spec import JobError, JobSpec

Log = Callable[[str], None]


@dataclass
class TrainResult:
    """What a seller's run produced: the adapter, its hash and the seller's own score."""

    adapter_dir: Path
    sha256: str
    metric: str
    score: float
    train_rows: int
    validation_rows: int
    steps: int
    epochs: float
    train_loss: float | None
    stopped_by: str | None            # a buyer limit that ended training early, if any
    training: dict
    base_model: str
    timings: dict[str, float] = field(default_factory=dict)

    def artifact(self) -> dict:
        """The `artifact` of submit_result: where the adapter is and what it must hash to."""
        return {"repo": str(self.adapter_dir.resolve()), "revision": self.sha256[:12], "sha256": self.sha256,
                "format": "peft-lora", "files": adapter_files(self.adapter_dir), "base_model": self.base_model,
                "validation_rows": self.validation_rows, "steps": self.steps}


@dataclass
class Stage:
    """The adapter as it was at one stage of a staged run, scored on the validation split."""

    step: int
    score: float
    adapter_dir: Path
    sha256: str
    base_model: str

    def artifact(self) -> dict:
        return {"repo": str(self.adapter_dir.resolve()), "revision": self.sha256[:12], "sha256": self.sha256,
                "format": "peft-lora", "base_model": self.base_model, "steps": self.step}


@dataclass
class Evaluation:
    metric: str
    score: float
    rows: int
    seconds: float


def load_metric(spec: JobSpec):
    """The job's metric as an `evaluate` module, loaded from its local file."""
    import evaluate
    return evaluate.load(str(spec.metric_path()))


def load_rows(path: Path, cache_dir: Path):
    """A JSON-lines file as a `datasets.Dataset` (the datasets library's own json loader)."""
    from datasets import load_dataset
    if not Path(path).is_file():
        raise JobError(f"no data file at {path}")
    return load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache_dir), keep_in_memory=True)


class _Task:
    """What differs between tasks: model class, LoRA task type, encoding, collation, scoring."""

    def __init__(self, spec: JobSpec, model_path: str, local: bool):
        self.spec = spec
        self.model_path = model_path
        self.local = local
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=local)

    def lora_config(self):
        from peft import LoraConfig
        t = self.spec.training
        return LoraConfig(task_type=self.task_type, r=t.lora_r, lora_alpha=t.lora_alpha,
                          lora_dropout=t.lora_dropout, target_modules=list(t.target_modules))

    def metrics_fn(self, metric) -> Callable[[Any], dict]:
        name = self.spec.metric

        def compute(eval_pred) -> dict:
            predictions, references = self.decode(eval_pred.predictions, eval_pred.label_ids)
            return {name: float(metric.compute(predictions=predictions, references=references)[name])}
        return compute

    @staticmethod
    def argmax(logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(dim=-1)


class SequenceClassification(_Task):
    @property
    def task_type(self):
        from peft import TaskType
        return TaskType.SEQ_CLS

    def base_model(self):
        from transformers import AutoModelForSequenceClassification
        labels = self.spec.labels
        return AutoModelForSequenceClassification.from_pretrained(
            self.model_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, local_files_only=self.local)

    def encode(self, ds):
        spec = self.spec
        index = {name: i for i, name in enumerate(spec.labels)}
        for column in (spec.text_field, spec.label_field):
            if column not in ds.column_names:
                raise JobError(f"the data has no {column!r} column (columns: {', '.join(ds.column_names)})")

        def label_id(value: Any) -> int:
            if isinstance(value, str) and value in index:
                return index[value]
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(index):
                return value
            raise JobError(f"label {value!r} is not one of {list(spec.labels)} (or their indexes)")

        def fn(batch):
            out = self.tokenizer(batch[spec.text_field], truncation=True, max_length=spec.training.max_length)
            out["labels"] = [label_id(v) for v in batch[spec.label_field]]
            return out
        return ds.map(fn, batched=True, remove_columns=ds.column_names)

    def collator(self):
        from transformers import DataCollatorWithPadding
        return DataCollatorWithPadding(self.tokenizer)

    def decode(self, predictions, label_ids):
        return predictions.tolist(), label_ids.tolist()


class CausalLM(_Task):
    def __init__(self, spec: JobSpec, model_path: str, local: bool):
        super().__init__(spec, model_path, local)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def task_type(self):
        from peft import TaskType
        return TaskType.CAUSAL_LM

    def base_model(self):
        import torch
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32,
                                                    local_files_only=self.local)

    def encode(self, ds):
        spec, tok = self.spec, self.tokenizer
        for column in (spec.prompt_field, spec.completion_field):
            if column not in ds.column_names:
                raise JobError(f"the data has no {column!r} column (columns: {', '.join(ds.column_names)})")
        max_length = spec.training.max_length

        def fn(row):
            prompt = tok(row[spec.prompt_field])["input_ids"]
            answer = tok(row[spec.completion_field], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            prompt = prompt[-max(1, max_length - len(answer)):]  # keep the answer whole; cut the prompt's start
            ids = prompt + answer
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + answer}
        return ds.map(fn, remove_columns=ds.column_names)

    def collator(self):
        import torch
        pad = self.tokenizer.pad_token_id

        def collate(rows: list[dict]) -> dict:
            width = max(len(r["input_ids"]) for r in rows)

            def padded(key: str, value: int):
                return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])
            return {"input_ids": padded("input_ids", pad), "attention_mask": padded("attention_mask", 0),
                    "labels": padded("labels", -100)}
        return collate

    def decode(self, predictions, label_ids):
        tok = self.tokenizer
        predicted, expected = [], []
        for pred, labels in zip(predictions, label_ids):
            mask = labels[1:] != -100          # logits at t predict the token at t + 1
            predicted.append(tok.decode(pred[:-1][mask].tolist()))
            expected.append(tok.decode(labels[1:][mask].tolist()))
        return predicted, expected


TASK_CLASSES = {"sequence-classification": SequenceClassification, "causal-lm": CausalLM}


@contextlib.contextmanager
def _peft_quietly():
    """peft 0.21 asks transformers 5 for `is_gradient_checkpointing`, which warns it is deprecated: not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextlib.contextmanager
def cpu_threads(count: int):
    """Use `count` torch CPU threads inside the block (0: leave as is). On a busy machine one
    thread per process is often several times faster than threads that wait on each other."""
    import torch
    before = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_task(spec: JobSpec, base_model: str | Path | None = None) -> _Task:
    from .models import resolve_model
    model_path, local = resolve_model(spec.base_model, base_model)
    return TASK_CLASSES[spec.task](spec, model_path, local)


def _quiet(trainer) -> None:
    """No log dicts printed to stdout (with tqdm off the Trainer prints them): callers report instead."""
    from transformers.trainer_callback import PrinterCallback
    trainer.remove_callback(PrinterCallback)


def _arguments(spec: JobSpec, output_dir: Path, **extra: Any):
    import torch
    from transformers import TrainingArguments
    t = spec.training
    if t.stage_steps > 0:  # a staged run scores the adapter every stage_steps (what milestones are judged on)
        extra = dict(eval_strategy="steps", eval_steps=t.stage_steps, **extra)
    else:
        extra = dict(eval_strategy="no", **extra)
    return TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.eval_batch_size,
        learning_rate=t.learning_rate, warmup_steps=t.warmup, seed=t.seed, data_seed=t.seed,
        save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        logging_steps=max(1, min(25, t.max_steps if t.max_steps > 0 else 25)), **extra)


# accelerate keeps one process-wide state that each new Trainer resets: a Trainer made while
# another one runs (a verifier scoring in the process where a seller trains, as the notebooks
# do) breaks the running one mid-step. One Trainer at a time; a training lets go of its turn
# while it hands a stage out, since the stage's buyer may be verifying the last one.
_ONE_TRAINER = threading.Lock()


def _letting_go(on_stage: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def hand_out(stage: Any) -> bool:
        _ONE_TRAINER.release()
        try:
            return on_stage(stage)
        finally:
            _ONE_TRAINER.acquire()
    return hand_out


def train_adapter(spec: JobSpec, output_dir: str | Path, *, train_path: str | Path | None = None,
                  base_model: str | Path | None = None, progress: Any = None, log: Log | None = None,
                  on_stage: Callable[[Stage], bool] | None = None) -> TrainResult:
    """As the seller: train a LoRA adapter for `spec`, score it on a validation split, save and hash it.

    The adapter goes to `<output_dir>/adapter`. `progress` is a `TrainerCallback` (such as
    `RichProgress()`) or None; `log` gets one line per phase. With `training.stage_steps`,
    every stage's adapter is saved to `<output_dir>/stages/step-N` and given to `on_stage`
    (the final one too); `on_stage` answering true ends training there.

    Example:
        >>> result = train_adapter(JobSpec.load("jobs/minilm-negation-sentiment.toml"), "runs/try")
        >>> result.score, result.sha256[:8]                                   # doctest: +SKIP
        (0.99, '3b1f0c2e')
    """
    with _ONE_TRAINER, cpu_threads(spec.training.threads):
        return _train(spec, Path(output_dir), train_path, base_model, progress, log or (lambda message: None),
                      on_stage and _letting_go(on_stage))


def _train(spec: JobSpec, output_dir: Path, train_path: str | Path | None, base_model: str | Path | None,
           progress: Any, say: Log, on_stage: Callable[[Stage], bool] | None) -> TrainResult:
    from peft import get_peft_model
    from transformers import Trainer, set_seed

    from .progress import Limits, Stages
    output_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir = output_dir / "adapter"
    t = spec.training
    timings: dict[str, float] = {}

    start = time.perf_counter()
    rows = load_rows(Path(train_path or spec.train), output_dir / "cache")
    if len(rows) > spec.limits.max_train_rows:
        raise JobError(f"the training data has {len(rows)} rows, over this job's limit of {spec.limits.max_train_rows}")
    split = rows.train_test_split(test_size=t.validation_fraction, seed=t.seed)
    say(f"loading {spec.base_model}")
    set_seed(t.seed)  # the new head and the LoRA matrices are initialised from this seed
    task = make_task(spec, base_model)
    train_ds, val_ds = task.encode(split["train"]), task.encode(split["test"])
    with _peft_quietly():
        model = get_peft_model(task.base_model(), task.lora_config())
    metric = load_metric(spec)
    timings["load_s"] = time.perf_counter() - start

    limits = Limits(spec.limits.max_steps, spec.limits.max_wall_seconds)
    callbacks = [limits] + ([progress] if progress is not None else [])
    if on_stage is not None:
        def snapshot(model, step: int, score: float) -> Stage:
            folder = output_dir / "stages" / f"step-{step:05d}"
            model.save_pretrained(str(folder))
            return Stage(step, score, folder, adapter_sha256(folder), spec.base_model)
        callbacks.append(Stages(on_stage, snapshot, spec.metric))
    trainer = Trainer(model=model, args=_arguments(spec, output_dir / "trainer"), train_dataset=train_ds,
                      eval_dataset=val_ds, data_collator=task.collator(), compute_metrics=task.metrics_fn(metric),
                      preprocess_logits_for_metrics=task.argmax, callbacks=callbacks)
    _quiet(trainer)
    say(f"training on {len(train_ds)} rows ({t.epochs} epochs, max_steps {t.max_steps}, lr {t.learning_rate})")
    start = time.perf_counter()
    output = trainer.train()
    timings["train_s"] = time.perf_counter() - start

    say(f"scoring on the {len(val_ds)}-row validation split")
    start = time.perf_counter()
    score = float(trainer.evaluate()[f"eval_{spec.metric}"])
    timings["eval_s"] = time.perf_counter() - start

    start = time.perf_counter()
    model.save_pretrained(str(adapter_dir))
    timings["save_s"] = time.perf_counter() - start
    start = time.perf_counter()
    sha = adapter_sha256(adapter_dir)
    timings["hash_s"] = time.perf_counter() - start
    epochs = float(trainer.state.epoch or 0.0)
    loss = output.training_loss
    return TrainResult(
        adapter_dir=adapter_dir, sha256=sha, metric=spec.metric, score=score, train_rows=len(train_ds),
        validation_rows=len(val_ds), steps=int(trainer.state.global_step), epochs=epochs,
        train_loss=None if loss is None or math.isnan(loss) else float(loss), stopped_by=limits.stopped_by,
        training=t.to_dict(), base_model=spec.base_model, timings=timings)


def evaluate_adapter(spec: JobSpec, adapter_dir: str | Path, data_path: str | Path, *,
                     base_model: str | Path | None = None, log: Log | None = None) -> Evaluation:
    """Score an adapter on `data_path` with the job's metric (the verifier's side).

    Example:
        >>> evaluate_adapter(spec, "runs/esc_1/adapter", "jobs/data/held_out.jsonl").score   # doctest: +SKIP
        0.9875
    """
    with _ONE_TRAINER, cpu_threads(spec.training.threads):
        return _evaluate(spec, Path(adapter_dir), Path(data_path), base_model, log or (lambda message: None))


def _evaluate(spec: JobSpec, adapter_dir: Path, data_path: Path, base_model: str | Path | None,
              say: Log) -> Evaluation:
    from peft import PeftModel
    from transformers import Trainer
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hf-escrow-eval-") as work:
        rows = load_rows(Path(data_path), Path(work) / "cache")
        say(f"loading {spec.base_model} with the adapter")
        task = make_task(spec, base_model)
        data = task.encode(rows)
        with _peft_quietly():
            model = PeftModel.from_pretrained(task.base_model(), str(adapter_dir), is_trainable=False)
        trainer = Trainer(model=model, args=_arguments(spec, Path(work) / "trainer"), eval_dataset=data,
                          data_collator=task.collator(), compute_metrics=task.metrics_fn(load_metric(spec)),
                          preprocess_logits_for_metrics=task.argmax)
        _quiet(trainer)
        say(f"scoring on {len(data)} held-out rows")
        score = float(trainer.evaluate()[f"eval_{spec.metric}"])
    return Evaluation(metric=spec.metric, score=score, rows=len(data), seconds=time.perf_counter() - start)
