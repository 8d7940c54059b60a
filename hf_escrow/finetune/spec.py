"""Job specs: a TOML file the buyer writes, and the public part of it that goes in the escrow.

A spec names the base model, the task, the training data (given to the seller), the
held-out data (the verifier's, never given to the seller), the metric and threshold,
the budget and TTL, the seller and verifier, and the training limits. Paths are
relative to the spec file. Example (`jobs/minilm-negation-sentiment.toml`)::

    name = "minilm-negation-sentiment"
    task = "sequence-classification"          # or "causal-lm"
    base_model = "sentence-transformers/all-MiniLM-L6-v2"

    [escrow]
    seller = "seller-1"
    verifier = "buyer"                         # "buyer" (default), "self" (seeds), or an agent id
    budget_usdc = "5.00"
    ttl_seconds = 86400

    [benchmark]
    metric = "accuracy"                        # a packaged metric module, or metric_module = "x.py"
    threshold = 0.9

    # or, instead of one threshold, milestones that each release a share as they are reached:
    # milestones = [{threshold = 0.80, share_bps = 3000}, {threshold = 0.88, share_bps = 4000},
    #               {threshold = 0.92, share = "rest"}]

    [data]
    train = "data/minilm-negation-sentiment/train.jsonl"
    held_out = "data/minilm-negation-sentiment/held_out.jsonl"
    labels = ["negative", "positive"]

    [data.generate]                            # optional: how `jobs make-data` writes the files
    generator = "negation-sentiment"
    train_seed = 1
    train_rows = 800
    held_out_seed = 2
    held_out_rows = 400

    [training]                                 # the seller's defaults
    epochs = 2
    learning_rate = 2e-3

    [limits]                                   # ceilings the buyer imposes on the seller
    max_epochs = 4
    max_steps = 1000

`JobSpec.public_meta()` is what the escrow carries: everything but the held-out data,
which is committed to by sha256 and row count only. `JobSpec.from_meta()` turns it back
into a spec on the seller's or verifier's side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from .._exceptions import JobError
from .data import GENERATORS, count_rows, file_sha256

TASKS = ("sequence-classification", "causal-lm")
META_KIND = "hf-escrow/lora-job"
META_VERSION = 1
METRICS_DIR = Path(__file__).resolve().parent / "metrics"


@dataclass(frozen=True)
class Training:
    """Hyperparameters: the spec's are the seller's defaults; the seller may change them within the limits."""

    epochs: float = 1.0
    max_steps: int = -1               # > 0 stops after this many optimizer steps
    learning_rate: float = 2e-4
    batch_size: int = 8
    eval_batch_size: int = 32
    max_length: int = 64
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")
    validation_fraction: float = 0.1  # the seller's own validation split, cut from the training data
    seed: int = 0
    warmup: float = 0.0               # warmup steps, or a fraction of the steps when < 1
    threads: int = 0                  # torch CPU threads while training/scoring; 0 = torch's default
    stage_steps: int = 0              # > 0: score and snapshot the adapter every this many steps (milestones)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data


@dataclass(frozen=True)
class Limits:
    """What the buyer allows: a run asking for more is refused before it starts."""

    max_epochs: float = 10.0
    max_steps: int = 10_000
    max_train_rows: int = 1_000_000
    max_wall_seconds: float = 24 * 3600.0  # training stops (and is evaluated as is) after this long

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Generate:
    """A deterministic recipe for the data files (`hf_escrow.finetune.data.GENERATORS`)."""

    generator: str
    train_seed: int = 1
    train_rows: int = 1000
    held_out_seed: int = 2
    held_out_rows: int = 400


@dataclass(frozen=True)
class JobSpec:
    name: str
    task: str
    base_model: str
    metric: str
    threshold: float
    train: Path
    held_out: Path | None = None          # None on the seller's side: it never sees it
    higher_is_better: bool = True
    metric_module: Path | None = None     # None: the packaged module named `metric`
    description: str | None = None
    seller: str | None = None
    verifier: str = "buyer"
    budget: str = "1.00"
    ttl_seconds: int = 86_400
    text_field: str = "text"
    label_field: str = "label"
    labels: tuple[str, ...] = ()
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    generate: Generate | None = None
    training: Training = field(default_factory=Training)
    limits: Limits = field(default_factory=Limits)
    path: Path | None = None              # the spec file, when loaded from one
    train_sha256: str | None = None       # commitments carried in the escrow meta
    held_out_sha256: str | None = None
    held_out_rows: int | None = None
    milestones: tuple[dict, ...] = ()     # the ledger's normalised milestones; () = one threshold

    # ---- loading --------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "JobSpec":
        """Read and check a TOML spec; relative data paths are taken from the spec's folder."""
        path = Path(path).expanduser().resolve()
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise JobError(f"no job spec at {path}") from None
        except tomllib.TOMLDecodeError as error:
            raise JobError(f"{path} is not valid TOML: {error}") from None
        return cls.from_dict(raw, base_dir=path.parent, path=path)

    @classmethod
    def from_dict(cls, raw: dict, *, base_dir: Path, path: Path | None = None) -> "JobSpec":
        where = str(path or "spec")
        raw = dict(raw)
        escrow = _table(raw, "escrow", where)
        bench = _table(raw, "benchmark", where)
        data = _table(raw, "data", where)
        training_raw = _table(raw, "training", where)
        limits_raw = _table(raw, "limits", where)
        generate_raw = data.pop("generate", None)

        def rel(value: Any, what: str) -> Path:
            if not isinstance(value, str) or not value:
                raise JobError(f"{where}: {what} must be a path (relative to the spec)")
            return (base_dir / Path(value).expanduser()).resolve()

        name = _req(raw, "name", str, where)
        task = _req(raw, "task", str, where)
        if task not in TASKS:
            raise JobError(f"{where}: task {task!r} is not supported; use one of {', '.join(TASKS)}")
        metric = _req(bench, "metric", str, f"{where} [benchmark]")
        higher = bool(bench.get("higher_is_better", True))
        milestones = _milestones(bench, metric, higher, f"{where} [benchmark]")
        spec = cls(
            name=name, task=task, base_model=_req(raw, "base_model", str, where),
            description=raw.get("description"), metric=metric, milestones=milestones,
            threshold=milestones[-1]["threshold"] if milestones
            else float(_req(bench, "threshold", (int, float), f"{where} [benchmark]")),
            higher_is_better=higher,
            metric_module=rel(bench["metric_module"], "metric_module") if bench.get("metric_module") else None,
            seller=escrow.get("seller"), verifier=str(escrow.get("verifier") or "buyer"),
            budget=_budget(escrow.get("budget_usdc", "1.00"), where),
            ttl_seconds=int(escrow.get("ttl_seconds", 86_400)),
            train=rel(data.get("train"), "[data] train"),
            held_out=rel(data["held_out"], "[data] held_out") if data.get("held_out") else None,
            text_field=data.get("text_field", "text"), label_field=data.get("label_field", "label"),
            labels=tuple(data.get("labels", ())), prompt_field=data.get("prompt_field", "prompt"),
            completion_field=data.get("completion_field", "completion"),
            generate=_dataclass(Generate, generate_raw, f"{where} [data.generate]") if generate_raw else None,
            training=_dataclass(Training, training_raw, f"{where} [training]"),
            limits=_dataclass(Limits, limits_raw, f"{where} [limits]"),
            path=path,
        )
        spec.check()
        return spec

    def check(self) -> None:
        """Refuse specs that cannot run or cannot be judged."""
        where = str(self.path or self.name)
        if self.task == "sequence-classification" and len(self.labels) < 2:
            raise JobError(f"{where}: a sequence-classification job needs [data] labels = [at least two names]")
        if self.generate and self.generate.generator not in GENERATORS:
            raise JobError(f"{where}: unknown generator {self.generate.generator!r}; "
                           f"known: {', '.join(sorted(GENERATORS))}")
        if not 0 < self.training.validation_fraction < 1:
            raise JobError(f"{where}: training.validation_fraction must be between 0 and 1")
        if self.milestones and self.verifier == "self":
            raise JobError(f"{where}: milestones are paid on a verifier's own score; verifier must be \"buyer\" "
                           "or another agent, not \"self\"")
        if self.ttl_seconds < 60:
            raise JobError(f"{where}: ttl_seconds must leave time to train (at least 60)")
        self.metric_path()  # the metric module must exist
        self.check_training(self.training)

    def check_training(self, training: Training) -> None:
        """A run's hyperparameters against the buyer's limits."""
        limits = self.limits
        if training.epochs <= 0 and training.max_steps <= 0:
            raise JobError("training needs epochs > 0 or max_steps > 0")
        if training.epochs > limits.max_epochs:
            raise JobError(f"epochs {training.epochs} is over this job's limit of {limits.max_epochs}")
        if training.max_steps > limits.max_steps:
            raise JobError(f"max_steps {training.max_steps} is over this job's limit of {limits.max_steps}")
        if training.learning_rate <= 0 or training.batch_size < 1 or training.lora_r < 1:
            raise JobError("learning_rate, batch_size and lora_r must be positive")

    # ---- derived --------------------------------------------------------------------

    def metric_path(self) -> Path:
        """The local `evaluate` module that computes `metric` (the hub's cannot load offline)."""
        path = self.metric_module or METRICS_DIR / f"{self.metric}.py"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in METRICS_DIR.glob("*.py")))
            raise JobError(f"no metric module for {self.metric!r} at {path}; packaged metrics: {known} "
                           "(or give [benchmark] metric_module = \"path/to/metric.py\")")
        return path

    def release_condition(self) -> dict:
        if self.milestones:
            return {"type": "milestones", "metric": self.metric, "higher_is_better": self.higher_is_better,
                    "verifier": self.verifier, "milestones": [_as_input(m) for m in self.milestones]}
        return {"type": "benchmark", "metric": self.metric, "threshold": self.threshold,
                "higher_is_better": self.higher_is_better, "verifier": self.verifier}

    def sha256(self) -> str:
        """A fingerprint of the job (its public part), to find its escrow from the spec."""
        public = self.public_meta(commit=False)["job"]
        for key in ("train", "held_out", "spec_sha256"):
            public.pop(key, None)
        return hashlib.sha256(json.dumps(public, sort_keys=True).encode()).hexdigest()

    def public_meta(self, *, commit: bool = True) -> dict:
        """The escrow's meta: the job without the held-out data, which is committed to by hash only.

        With `commit`, the data files must exist (generate them first): their sha256 and
        row counts are recorded, so the seller can check its training data and the
        verifier cannot swap its held-out set after the fact.
        """
        train: dict[str, Any] = {"path": str(self.train)}
        held_out: dict[str, Any] = {}
        if self.generate:
            g = self.generate
            train["generate"] = {"generator": g.generator, "seed": g.train_seed, "rows": g.train_rows}
        if commit:
            for file, what in ((self.train, "train"), (self.held_out, "held_out")):
                if file is None or not file.is_file():
                    raise JobError(f"{what} data {file} does not exist; run `hf-escrow jobs make-data` first")
            train.update(sha256=file_sha256(self.train), rows=count_rows(self.train))
            held_out.update(sha256=file_sha256(self.held_out), rows=count_rows(self.held_out))
        job = {
            "kind": META_KIND, "version": META_VERSION, "name": self.name, "task": self.task,
            "base_model": self.base_model, "description": self.description,
            "metric": self.metric, "threshold": self.threshold, "higher_is_better": self.higher_is_better,
            "metric_sha256": file_sha256(self.metric_path()), "metric_module": self.metric_module is not None,
            "fields": {"text": self.text_field, "label": self.label_field, "prompt": self.prompt_field,
                       "completion": self.completion_field},
            "labels": list(self.labels), "train": train, "held_out": held_out,
            "milestones": [dict(m) for m in self.milestones],
            "training": self.training.to_dict(), "limits": self.limits.to_dict(),
        }
        if commit:
            job["spec_sha256"] = self.sha256()
        return {"model": self.base_model, "job": job}

    @classmethod
    def from_meta(cls, meta: dict | None) -> "JobSpec":
        """The seller's view of a job, from its escrow's meta (no held-out data)."""
        job = (meta or {}).get("job")
        if not isinstance(job, dict) or job.get("kind") != META_KIND:
            raise JobError("this escrow is not a fine-tune job (its meta has no hf-escrow job); "
                           "post one with `hf-escrow jobs post SPEC`")
        if job.get("version") != META_VERSION:
            raise JobError(f"job meta version {job.get('version')} is not supported by this hf-escrow")
        fields = job["fields"]
        gen = job["train"].get("generate")
        training = dict(job["training"])
        training["target_modules"] = tuple(training["target_modules"])
        return cls(
            name=job["name"], task=job["task"], base_model=job["base_model"], description=job.get("description"),
            metric=job["metric"], threshold=float(job["threshold"]), higher_is_better=job["higher_is_better"],
            train=Path(job["train"]["path"]), held_out=None,
            text_field=fields["text"], label_field=fields["label"], labels=tuple(job["labels"]),
            prompt_field=fields["prompt"], completion_field=fields["completion"],
            generate=Generate(gen["generator"], train_seed=gen["seed"], train_rows=gen["rows"]) if gen else None,
            training=Training(**training), limits=Limits(**job["limits"]),
            train_sha256=job["train"].get("sha256"), held_out_sha256=job["held_out"].get("sha256"),
            held_out_rows=job["held_out"].get("rows"), milestones=tuple(job.get("milestones") or ()),
        )

    def with_training(self, **changes: Any) -> "JobSpec":
        """The same job with some hyperparameters changed (checked against the limits)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "target_modules" in changes:
            changes["target_modules"] = tuple(changes["target_modules"])
        unknown = set(changes) - {f.name for f in dataclasses.fields(Training)}
        if unknown:
            raise JobError(f"unknown training settings: {', '.join(sorted(unknown))}")
        training = dataclasses.replace(self.training, **changes)
        self.check_training(training)
        return dataclasses.replace(self, training=training)

    def with_data_dir(self, folder: str | Path, **generate: Any) -> "JobSpec":
        """The same job with its data files in `folder` (and the generator's sizes changed)."""
        folder = Path(folder).resolve()
        gen = dataclasses.replace(self.generate, **generate) if self.generate else None
        return dataclasses.replace(self, train=folder / self.train.name,
                                   held_out=folder / self.held_out.name if self.held_out else None, generate=gen)


def _milestones(bench: dict, metric: str, higher: bool, where: str) -> tuple[dict, ...]:
    """[benchmark] milestones, checked by the ledger's own rule (so a spec fails as the escrow would)."""
    from ..ledger.rules import check_milestones
    from .._exceptions import ValidationError
    if "milestones" not in bench:
        return ()
    if "threshold" in bench:
        raise JobError(f"{where}: give threshold or milestones, not both")
    try:
        condition = check_milestones({"type": "milestones", "metric": metric, "higher_is_better": higher,
                                      "milestones": bench["milestones"]})
    except ValidationError as error:
        raise JobError(f"{where}: {error.message}") from None
    return tuple(condition["milestones"])


def _as_input(milestone: dict) -> dict:
    """A normalised milestone as a release condition writes it."""
    if milestone["rest"]:
        return {"threshold": milestone["threshold"], "share": "rest"}
    return {"threshold": milestone["threshold"], "share_bps": milestone["share_bps"]}


def _table(raw: dict, name: str, where: str) -> dict:
    value = raw.pop(name, {})
    if not isinstance(value, dict):
        raise JobError(f"{where}: [{name}] must be a table")
    return dict(value)


def _req(raw: dict, key: str, kind: Any, where: str) -> Any:
    value = raw.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        raise JobError(f"{where}: {key} is required ({getattr(kind, '__name__', 'number')})")
    return value


def _budget(value: Any, where: str) -> str:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise JobError(f"{where}: [escrow] budget_usdc must be a USDC amount such as \"5.00\"") from None
    if not amount.is_finite() or amount <= 0:
        raise JobError(f"{where}: [escrow] budget_usdc must be positive")
    return str(amount)


def _dataclass(cls: Any, raw: dict, where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise JobError(f"{where}: unknown keys {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    if "target_modules" in raw:
        raw = dict(raw, target_modules=tuple(raw["target_modules"]))
    try:
        return cls(**raw)
    except TypeError as error:
        raise JobError(f"{where}: {error}") from None
