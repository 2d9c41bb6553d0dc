"""A pydantic model for every JSON file or message that crosses a stage boundary.

Each model is read with `Model.read(path)` and written with `model.write(path)` (atomically: temporary
name, fsync, rename) and nowhere else; the stores say where each file lives. A file that does not
parse as its model was written by an incompatible version of sftflow (or changed by hand) and is
refused with `WorkspaceError`, naming the file and the field.

Files (under the workspace)                          model
  drops/<id>/report.json                              DropReport
  datasets/<version>/manifest.json                    DatasetManifest (its drops: DropRecord)
  datasets/<version>/tokenized/<key>/tokenized.json   Tokenized        (tasks.tokenize's cache)
  landing/.emitted/<id>.json, landing/.refused/...    EmittedRecord, RefusedRecord
  runs/<id>/worker_spec.json                          WorkerSpec       (train task -> training process)
  runs/<id>/progress.jsonl, the worker's stdout       WorkerEvent      (one per line, both ends)
  runs/<id>/manifest.json                             RunManifest
  runs/<id>/evaluator_spec.json, eval_scores.json     EvaluatorSpec, EvalScores (evaluate task <-> process)
  runs/<id>/eval.json                                 EvalReport
  runs/<id>/export.json                               ExportReport
  registry/<name>/<version>/manifest.json             VersionManifest
  stack/state.json                                    StackState
  prefect/local-api.json                              LocalApiState
Messages
  flow results                                        DropReport, RunSummary, EvalReport, ExportReport,
                                                      PublishResult, PipelineSummary
  events                                              LandedPayload (sftflow.drop.landed),
                                                      DatasetUpdatedPayload (sftflow.dataset.updated)

Keys that a variant of a file does not have (the error of a rejected drop, the files of a failed
export) are left out of the JSON, not written as null: a model dumps the fields that were set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from foundation.atomic import write_bytes_atomic
from foundation.errors import WorkspaceError


class Artifact(BaseModel):
    """A JSON document with one reader (`read`) and one writer (`write`)."""

    model_config = ConfigDict(extra="forbid")
    not_on_disk: ClassVar[frozenset[str]] = frozenset()  # fields a message carries but its file does not

    @classmethod
    def parse(cls, data: bytes | str | dict, source: str) -> Self:
        try:
            if isinstance(data, dict):
                return cls.model_validate(data)
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise WorkspaceError(unreadable(source, cls.__name__, exc)) from exc

    @classmethod
    def read(cls, path: Path) -> Self:
        return cls.parse(path.read_bytes(), str(path))

    def dump(self) -> dict[str, Any]:
        """The JSON object: the fields that were set (a variant's absent keys stay absent)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def write(self, path: Path) -> None:
        document = {k: v for k, v in self.dump().items() if k not in self.not_on_disk}
        write_bytes_atomic(path, orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")


def unreadable(source: str, what: str, exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return (f"{source}: not a {what} this version of sftflow reads ({where}: {first['msg']}); it was written by "
            "another version of sftflow or changed by hand: restore it, or use a new workspace (SFTFLOW_HOME)")


# ---------------------------------------------------------------------------------------------
# Drops and dataset versions
# ---------------------------------------------------------------------------------------------


class SplitRows(Artifact):
    train: int
    eval: int


class FileRead(Artifact):
    """How one file of a drop was read."""

    format: str | None
    rows: int
    quarantined_on_read: int


class FileDigest(Artifact):
    sha256: str
    bytes: int


class DropRecord(Artifact):
    """A drop as recorded in the lineage of every dataset version after it."""

    drop_id: str
    fingerprint: str
    rows_in: int
    quarantined: int
    ingested_at: str
    accepted: int
    duplicates: int


class DropReport(Artifact):
    """What became of every row of a drop: `rows_in == accepted + duplicates + quarantined + held_back`."""

    not_on_disk: ClassVar[frozenset[str]] = frozenset({"noop"})

    drop_id: str
    fingerprint: str
    status: Literal["ingested", "rejected"]
    noop: bool = False  # the drop was ingested before with the same content (a message, not on disk)
    files: dict[str, FileRead] | None = None
    rows_in: int
    accepted: int = 0
    duplicates: int = 0
    quarantined: int
    held_back: int = 0  # the valid rows of a rejected drop
    reasons: dict[str, int] = Field(default_factory=dict)
    reject_rate: float | None = None
    max_reject_rate: float | None = None
    ingested_at: str
    dataset_version: str | None
    dataset_changed: bool
    dataset_rows: SplitRows
    quarantine_path: str | None = None
    error: str | None = None
    # The descriptor that mapped the drop's columns and roles (tasks/ingest/descriptor.py): its source file,
    # kind, sha256, normalised entries ("datasets"), the entry each file was read with, and notes on what
    # was not applied. Absent when the drop had none.
    descriptor: dict[str, Any] | None = None


class DatasetManifest(Artifact):
    version: str
    content_hash: str
    schema_version: str
    parent: str | None
    created_at: str
    eval_ratio: float
    drops: list[DropRecord]
    rows: SplitRows
    files: dict[str, FileDigest]

    def records(self, drop_id: str) -> bool:
        return any(d.drop_id == drop_id for d in self.drops)

    def record_of(self, drop_id: str) -> DropRecord | None:
        return next((d for d in self.drops if d.drop_id == drop_id), None)


class DatasetUpdatedPayload(Artifact):
    dataset_version: str
    drop_id: str
    rows: SplitRows


class LandedPayload(Artifact):
    drop_id: str
    path: str
    files: int
    fingerprint: str


class EmittedRecord(LandedPayload):
    event_id: str
    emitted_at: float


class RefusedRecord(Artifact):
    name: str
    reason: str
    refused_at: float


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------


class WorkerSpec(Artifact):
    """What the train task hands the training process."""

    run_dir: str
    model_path: str
    engine: str
    config: dict[str, Any]


class Batching(Artifact):
    """How a run batches: comparable across GPU counts by global_batch_size."""

    world_size: int | None = None
    per_device_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    global_batch_size: int | None = None


class BeginEvent(Batching):
    event: Literal["begin"] = "begin"
    max_steps: int
    resumed_from_step: int


class LogEvent(Artifact):
    event: Literal["log"] = "log"
    step: int
    loss: float
    learning_rate: float | None = None
    epoch: float | None = None
    grad_norm: float | None = None
    trained_tokens: int
    elapsed_s: float


class CheckpointEvent(Artifact):
    event: Literal["checkpoint"] = "checkpoint"
    step: int


class EvalEvent(Artifact):
    event: Literal["eval"] = "eval"
    step: int
    eval_loss: float


class EndEvent(Batching):
    event: Literal["end"] = "end"
    global_step: int
    train_runtime: float
    trained_tokens: int
    non_pad_tokens: int
    train_loss: float | None
    peak_mem_gib: float
    peak_mem_gib_per_rank: list[float]
    adapter_dir: str
    attention_calls: dict[str, int] = Field(default_factory=dict)  # the attention path each call took
    # the process's start-up, seconds from its start (or from a warm worker's claim) to each step's end (imports_s,
    # model_s, data_s, trainer_s, first_step_s), first_step_at (epoch seconds: a benchmark measures from the
    # command that started it), warm (the job ran in a warm worker, foundation.warm)
    startup: dict[str, float | bool] = Field(default_factory=dict)


class ErrorEvent(Artifact):
    """Bad input (a config or model the worker cannot use): reported, never retried."""

    event: Literal["error"] = "error"
    message: str


WorkerEvent = Annotated[BeginEvent | LogEvent | CheckpointEvent | EvalEvent | EndEvent | ErrorEvent,
                        Field(discriminator="event")]
_EVENT = TypeAdapter(WorkerEvent)


def event_line(event: Artifact) -> str:
    """One event as the line the training process prints and progress.jsonl keeps."""
    return orjson.dumps({"event": event.event} | event.dump()).decode()


def parse_event(line: str | bytes, source: str = "a training event") -> WorkerEvent:
    """One line of the training process's stdout or of progress.jsonl; ValueError if it is no event."""
    try:
        return _EVENT.validate_json(line)
    except ValidationError as exc:
        raise ValueError(unreadable(source, "training event", exc)) from exc


class TokenizedSplit(Artifact):
    """One split as tokenized for training, with its gate counts."""

    rows: int
    trainable_tokens: int
    truncated: int
    truncation_rate: float
    trainable_share: float
    dropped_no_labels: int
    pad_is_eot: bool
    path: str

    @property
    def kept_rows(self) -> int:
        """The rows in the file: those that kept a trainable token."""
        return self.rows - self.dropped_no_labels


class Tokenized(Artifact):
    train: TokenizedSplit
    eval: TokenizedSplit
    eos_ids: list[int]


class RunFigures(Batching):
    """What a finished run's manifest and its summary both report."""

    adapter_dir: str
    engine: str
    global_step: int
    loss_first: float | None
    loss_last: float | None
    trained_tokens: int
    tokens_per_s: float | None
    peak_mem_gib: float
    dataset_version: str
    config_hash: str


class RunManifest(RunFigures):
    """The reproducibility record of a finished training run."""

    run_id: str
    config: dict[str, Any]  # a RunConfig (schemas.config) as JSON
    dataset_dir: str
    model_path: str  # the base model as trained: a local directory (a Hub id resolved to its snapshot)
    model_revision: str | None = None  # the Hub commit of that snapshot
    seed: int
    libraries: dict[str, str]
    hardware: dict[str, Any]
    train_runtime_s: float
    peak_mem_gib_per_rank: list[float] | None
    tokenized: Tokenized

    @property
    def name(self) -> str:
        """The run config's `name`: the model's name in the registry."""
        return self.config["name"]


class RunSummary(RunFigures):
    """What a finished training run reports (the train flow's result, `sftflow train --json`)."""

    run_id: str
    run_dir: str
    truncation_rate: float
    trainable_share: float


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


class ModelRef(Artifact):
    model_path: str
    adapter_dir: str | None


class EvaluatorSpec(Artifact):
    """What the evaluate task hands the evaluation process."""

    run_dir: str
    engine: str
    dataset_dir: str
    config: dict[str, Any]
    models: dict[str, ModelRef]  # base, candidate, champion
    out: str


class Answer(Artifact):
    prompt: str
    reference: str
    prediction: str
    stopped: bool  # ended with an end-of-turn token before the token limit


class ModelScores(Artifact):
    metrics: dict[str, float | None]
    answers: list[Answer]
    eval_rows: int
    timings: dict[str, float] = {}  # load_s, loss_s, generate_s, generated_tokens


class EvalScores(Artifact):
    """What the evaluation process hands back: each model's metrics and answers."""

    models: dict[str, ModelScores]


class Decision(Artifact):
    promote: bool
    primary_metric: str
    margin: float
    reason: str


class EvalReport(Artifact):
    """Base vs candidate vs champion on a run's held-out split, and the promotion decision."""

    run_id: str
    dataset_version: str
    scores: dict[str, dict[str, float | None]]
    decision: Decision
    champion: str | None
    sample_size: int
    eval_rows: int
    answers: dict[str, list[Answer]] | None = None  # on disk; the flow's result leaves them out

    def without_answers(self) -> "EvalReport":
        return EvalReport(**{k: getattr(self, k) for k in self.model_fields_set if k != "answers"})


# ---------------------------------------------------------------------------------------------
# Export and the registry
# ---------------------------------------------------------------------------------------------


class Parity(Artifact):
    """A GGUF against the merged HF model on the same prompts."""

    token_ids_equal: float
    kl: float
    top1: float
    greedy_match: float | None  # None: not computed (the control, when the other figures already decide)
    passed: bool | None = None  # the control (the base without the adapter) has no thresholds

    def greedy_text(self) -> str:
        return "-" if self.greedy_match is None else f"{self.greedy_match:.3f}"


class ExportReport(Artifact):
    passed: bool
    parity: dict[str, Parity]
    timings: dict[str, float]
    failures: list[str] | None = None  # a failed export: the thresholds each GGUF missed
    run_id: str | None = None
    gguf_dir: str | None = None
    modelfile: str | None = None
    files: dict[str, str] | None = None
    bytes: dict[str, int] | None = None
    merged_dir: str | None = None
    llama_cpp_python: str | None = None


class VersionManifest(Artifact):
    """A registry version: what it is and the sha256 of every file in it."""

    name: str
    version: str
    run_id: str
    dataset_version: str
    promoted: bool
    published_at: str
    files: dict[str, FileDigest]


class PublishResult(Artifact):
    name: str
    version: str
    path: str
    promoted: bool
    champion: str | None
    remote: str | None = None
    hub: str | None = None


# ---------------------------------------------------------------------------------------------
# The pipeline and the stack
# ---------------------------------------------------------------------------------------------


class DropSummary(Artifact):
    drop_id: str | None
    status: str | None
    noop: bool | None
    rows_in: int | None
    accepted: int | None
    duplicates: int | None
    quarantined: int | None
    reasons: dict[str, int] | None
    dataset_version: str | None
    dataset_rows: SplitRows | None

    @classmethod
    def of(cls, report: DropReport) -> "DropSummary":
        return cls(**{k: getattr(report, k) for k in cls.model_fields})


class EvaluationSummary(Artifact):
    scores: dict[str, dict[str, float | None]]
    decision: Decision


class GgufSummary(Artifact):
    dir: str
    parity: dict[str, Parity]


class PipelineSummary(Artifact):
    """What one sft_pipeline run did (its result, `sftflow pipeline --json`)."""

    status: str
    drops: list[DropSummary] = Field(default_factory=list)
    config: str
    config_hash: str
    dataset_version: str | None = None
    dataset_rows: SplitRows | None = None
    reason: str | None = None
    registry_version: str | None = None
    training: RunSummary | None = None
    evaluation: EvaluationSummary | None = None
    gguf: GgufSummary | None = None
    published: PublishResult | None = None


class StackProcess(Artifact):
    pid: int
    command: list[str]
    log: str


class StackState(Artifact):
    """What `sftflow up` started, for `status` and `down`."""

    stack_id: str
    api_url: str
    dashboard_url: str
    workspace: str
    database: str
    started_at: float
    processes: dict[str, StackProcess] = Field(default_factory=dict)

class LocalApiState(Artifact):
    """The workspace's local Prefect API (sftflow/local_api.py), for the commands that reuse it."""

    local_api_id: str
    pid: int
    port: int
    idle_seconds: float
    log: str
    started_at: float

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.dashboard_url}/api"
