"""The training process: `python -m tasks.processes.trainer RUN_DIR/worker_spec.json`.

Launched by the `train_model` task (never imported by it), so that GPU memory is released when it
exits, a kill is survived (the retried task starts a new process that resumes from the last
checkpoint), and torchrun can run it on several GPUs. It reads the tokenized rows from the run
directory and reports progress on stdout as one `WorkerEvent` (foundation.artifacts) per line:

    {"event": "begin", "max_steps": 120, "resumed_from_step": 40, "world_size": 2, "per_device_batch_size": 8,
     "gradient_accumulation_steps": 1, "global_batch_size": 16}
    {"event": "log", "step": 45, "loss": 1.23, "learning_rate": 1e-4, "epoch": 1.1, "trained_tokens": 51234, ...}
    {"event": "checkpoint", "step": 60}
    {"event": "eval", "step": 60, "eval_loss": 1.4}
    {"event": "end", "global_step": 120, "train_runtime": 33.1, "trained_tokens": ..., "peak_mem_gib": ...,
     "peak_mem_gib_per_rank": [...], "world_size": 2, ... (as in begin),
     "attention_calls": {"varlen": 3840}}   (the attention path each call took, see packed_attention.CALLS)
    {"event": "error", "message": "model.load_in_4bit needs CUDA ..."}   (bad input; exit status 2)

`python -m tasks.processes.trainer SPEC --engine NAME` is the process started early (see
`tasks.train.start_worker_early`): it imports the engine's libraries (Unsloth's import alone is ~30 s on the
GPU machine) and loads the model while the run's rows are tokenized, then waits for RUN_DIR/worker.go, which
the train task writes once the gates passed. Either form may run in a warm worker (foundation.warm) that
imported the engine before the command started.

Everything else (library logs, warnings) goes to stderr, which the task saves to worker.log.

The run is `TrainingRecipe`'s named steps, in the manner of torchtune's recipes: set up the model, the
data, the trainer and its callbacks; train (resuming from the last complete checkpoint); save the
adapter. Under torchrun (several GPUs, DDP) every rank runs them; rank 0 alone emits events (errors
excepted) and writes the adapter; transformers' Trainer writes checkpoints from rank 0 only (each rank
adds its RNG state) and every rank resumes from the same last checkpoint. Token counts in events are
summed over the ranks, peak memory is each rank's own.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

from foundation import processes
from foundation.artifacts import (
    Artifact,
    Batching,
    BeginEvent,
    CheckpointEvent,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    LogEvent,
    WorkerSpec,
    event_line,
)
from foundation.errors import ConfigError, SftflowError
from foundation.stores.runs import RunDir
from schemas.config import RunConfig

_events = sys.stdout


def claim_stdout() -> None:
    """Keep stdout for events alone: anything else printed (by trl, Unsloth, C code) goes to stderr."""
    global _events
    _events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def emit(event: Artifact) -> None:
    _events.write(event_line(event) + "\n")
    _events.flush()


def exit_with_parent(interval_s: float = 1.0) -> None:
    """Exit when the process that started this one dies (the flow run killed, or `torchrun`'s agent
    under it): a trainer left running would write into the run directory the retry resumes from."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest checkpoint that was written to the end, or None.

    The Trainer writes a checkpoint's files in place and its trainer_state.json last, so a kill
    while saving leaves a directory without a readable trainer_state.json. Such a directory can
    never be resumed from; it is removed (and said so on stderr) so the run resumes from the one
    before it instead of failing on every retry.
    """
    found = []
    for path in checkpoints.glob("checkpoint-*") if checkpoints.is_dir() else []:
        if match := re.fullmatch(r"checkpoint-(\d+)", path.name):
            found.append((int(match.group(1)), path))
    for step, path in sorted(found, reverse=True):
        try:
            if json.loads((path / "trainer_state.json").read_text())["global_step"] == step:
                return str(path)
        except (OSError, ValueError, KeyError):
            pass
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"removing {path}: written only in part (the run was killed while saving it)", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)
    return None


def peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def sum_over_ranks(values: list[float], device) -> list[float]:
    """Element-wise sum over the data-parallel ranks (a collective: every rank must call it); as is alone."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def load_cpu_rank_locations() -> None:
    """On CPU ranks (SFTFLOW_CPU_RANKS, tests), let torch.load restore to "cpu:N": transformers resumes the
    optimizer onto `args.device`, which is "cpu:<rank>" there, a location torch.load does not know."""
    import torch.serialization

    torch.serialization.register_package(
        99, lambda obj: None, lambda storage, location: storage if location.startswith("cpu:") else None
    )


class TrainedTokens:
    """Counts the tokens of the micro-batches the trainer trains on: those with a label (the ones the model
    learns) and those that are not padding. Counted as each micro-batch enters `training_step`, not in the
    collator: the dataloader collates one batch ahead, which a collator would count without its being trained
    (per rank, so the count would depend on the number of ranks). Sums stay on the device until read."""

    def __init__(self, trainer):
        self._trained, self._non_pad = 0, 0
        step = trainer.training_step

        def counted_training_step(model, inputs, *args, **kwargs):
            self._trained = self._trained + (inputs["labels"] != -100).sum()
            mask = inputs.get("attention_mask")
            self._non_pad = self._non_pad + (mask.sum() if mask is not None else inputs["input_ids"].numel())
            return step(model, inputs, *args, **kwargs)

        trainer.training_step = counted_training_step

    @property
    def trained_tokens(self) -> int:
        return int(self._trained)

    @property
    def non_pad_tokens(self) -> int:
        return int(self._non_pad)


def sft_trainer_class():
    """trl's SFTTrainer, or on machines without Triton (CPU builds of torch) a subclass whose loss the
    model computes itself: trl 1.15 always scores tokens with a Triton kernel (its fused LM head)."""
    from trl import SFTTrainer
    from trl.trainer import utils as trl_utils

    if trl_utils._ChunkedLogProbFunction is not None:
        return SFTTrainer
    from transformers import Trainer

    class PlainLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return PlainLossSFTTrainer


def progress_callback(recipe: "TrainingRecipe"):
    """A TrainerCallback that reports the recipe's run as events (rank 0 only)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if recipe.is_main:
                emit(BeginEvent(max_steps=state.max_steps, resumed_from_step=state.global_step,
                                **recipe.batching.dump()))

        def on_log(self, args, state, control, logs=None, **kwargs):
            # Every rank logs at the same steps (the Trainer reduces the loss across them), so the token
            # count can be summed here; only rank 0 reports.
            if not logs or "loss" not in logs and "eval_loss" not in logs:
                return
            trained_tokens = int(sum_over_ranks([recipe.counter.trained_tokens], args.device)[0])
            if not recipe.is_main:
                return
            if "loss" in logs:
                emit(LogEvent(step=state.global_step, loss=logs["loss"], learning_rate=logs.get("learning_rate"),
                              epoch=logs.get("epoch"), grad_norm=logs.get("grad_norm"), trained_tokens=trained_tokens,
                              elapsed_s=round(time.monotonic() - recipe.started, 3)))
            if "eval_loss" in logs:
                emit(EvalEvent(step=state.global_step, eval_loss=logs["eval_loss"]))

        def on_save(self, args, state, control, **kwargs):
            if recipe.is_main:
                emit(CheckpointEvent(step=state.global_step))

        def on_step_end(self, args, state, control, **kwargs):
            if "first_step_s" not in recipe.startup:
                recipe.startup.update(first_step_s=round(processes.job_age_s(), 2), first_step_at=round(time.time(), 2))

    return Progress()


class TrainingRecipe:
    """One training run, as named steps: `setup()` (model, data, trainer, callbacks), then `train()`."""

    def __init__(self, spec: WorkerSpec):
        from tasks.engines import load_engine

        self.engine = load_engine(spec.engine)  # first: unsloth patches transformers/trl on import
        self.startup = {"imports_s": round(processes.job_age_s(), 2)}
        self.spec = spec
        self.config = RunConfig.model_validate(spec.config)
        self.run = RunDir(Path(spec.run_dir))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0

    def setup(self, model: bool = True, rest: bool = True) -> None:
        """The setup steps (the model's alone, for a process started early, or the others once the rows are there)."""
        steps = ((("model_s", self._setup_model),) if model else ()) + (
            (("data_s", self._setup_data), ("trainer_s", self._setup_trainer), ("callbacks_s", self._setup_callbacks))
            if rest else ())
        for name, step in steps:
            step()
            self.startup[name] = round(processes.job_age_s(), 2)

    def _setup_model(self) -> None:
        from transformers import set_seed

        # LoRA's A matrices start random: seeded, every run of a config (and every rank) starts alike
        set_seed(self.config.train.seed)
        self.model, self.tokenizer = self.engine.load(self.spec.model_path, self.config)
        # a packed route that cannot honour the model's attention would let documents see each other
        if self.config.train.packing and (problem := self.engine.packing_problem(self.model)):
            raise ConfigError(f"train.packing: {problem}")

    def _setup_data(self) -> None:
        import datasets

        datasets.disable_progress_bars()
        self.train_rows = datasets.Dataset.from_parquet(str(self.run.tokenized("train"))).remove_columns("id")
        self.eval_rows = datasets.Dataset.from_parquet(str(self.run.tokenized("eval"))).remove_columns("id")

    def _training_args(self):
        from trl import SFTConfig

        t = self.config.train
        return SFTConfig(
            output_dir=str(self.run.checkpoints),
            report_to=t.report_to or "none",
            run_name=self.run.run_id,  # what the trackers call the run
            max_length=t.max_seq_length,
            packing=t.packing,
            per_device_train_batch_size=t.batch_size,
            per_device_eval_batch_size=t.batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            num_train_epochs=t.epochs or 1.0,
            max_steps=t.max_steps or -1,
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler,
            warmup_steps=t.warmup_steps,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            optim=t.optim,
            seed=t.seed,
            data_seed=t.seed,
            logging_steps=t.logging_steps,
            save_steps=t.save_steps,
            save_total_limit=t.save_total_limit,
            eval_strategy="steps" if t.eval_steps else "no",
            eval_steps=t.eval_steps,
            disable_tqdm=True,
            # Trainer's NaN/inf filter reads each micro-batch's loss on the host (`bool(isnan(loss))`), which
            # waits for the backward before clipping and the optimizer can be queued; it only changes the
            # logged loss of a NaN step, which is better seen as NaN anyway.
            logging_nan_inf_filter=False,
            dataloader_num_workers=t.dataloader_workers,
            ddp_find_unused_parameters=False,
            **self.engine.sft_options(self.config),
        )

    def _setup_trainer(self) -> None:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(self.run.tensorboard))
        if self.is_main:  # the other ranks log to no tracker
            from tasks.trackers import start_tracker_runs

            os.environ.update(start_tracker_runs(self.run, self.config.train.report_to))
        args = self._training_args()
        self.trainer = sft_trainer_class()(
            model=self.model,
            args=args,
            train_dataset=self.train_rows,
            eval_dataset=self.eval_rows if len(self.eval_rows) else None,
            processing_class=self.tokenizer,
        )
        # Rows reach the collator as numpy arrays rather than Python lists: the collator builds the same
        # tensors (int64 either way) about ten times faster, host time that the GPU otherwise waits through
        # (~20 ms a step for 32 packed sequences of 2048 tokens, measured on one CPU thread).
        self.trainer.train_dataset = self.trainer.train_dataset.with_format("numpy")
        self.counter = TrainedTokens(self.trainer)
        per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
        self.batching = Batching(world_size=args.world_size, per_device_batch_size=per_device,
                                 gradient_accumulation_steps=accumulation,
                                 global_batch_size=per_device * accumulation * args.world_size)

    def _setup_callbacks(self) -> None:
        self.trainer.add_callback(progress_callback(self))

    def train(self) -> None:
        """Train from the last complete checkpoint; rank 0 saves the adapter and reports the end."""
        args = self.trainer.args
        if args.world_size > 1 and args.device.type == "cpu":
            load_cpu_rank_locations()
        self.started = time.monotonic()
        result = self.trainer.train(resume_from_checkpoint=last_complete_checkpoint(self.run.checkpoints))
        train_runtime = time.monotonic() - self.started
        peaks = [0.0] * args.world_size
        peaks[self.rank] = peak_memory_gib()
        totals = sum_over_ranks([self.counter.trained_tokens, self.counter.non_pad_tokens, *peaks], args.device)
        if not self.is_main:
            return
        self._save_adapter()
        from tasks.engines import packed_attention

        emit(EndEvent(global_step=self.trainer.state.global_step, train_runtime=round(train_runtime, 3),
                      trained_tokens=int(totals[0]), non_pad_tokens=int(totals[1]), train_loss=result.training_loss,
                      peak_mem_gib=round(max(totals[2:]), 3), peak_mem_gib_per_rank=[round(p, 3) for p in totals[2:]],
                      **self.batching.dump(), adapter_dir=str(self.run.adapter),
                      attention_calls=dict(packed_attention.CALLS), startup=self.startup))

    def _save_adapter(self) -> None:
        """The adapter appears whole or not at all: written aside, fsynced, then swapped into place (an
        earlier adapter stays until the new one is there: `foundation.atomic.replace_dir`)."""
        from foundation.atomic import replace_dir

        final, tmp = self.run.adapter, self.run.adapter_tmp
        shutil.rmtree(tmp, ignore_errors=True)
        self.trainer.model.save_pretrained(str(tmp))
        self.tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, final)


def wait_for(path: Path, interval_s: float = 0.05) -> float:
    """Started early (`--engine`): wait until the train task writes `path` (atomically); the seconds waited.
    The process ends with its parent (exit_with_parent) if the run stops before."""
    started = time.monotonic()
    while not path.exists():
        time.sleep(interval_s)
    return time.monotonic() - started


def main(spec_path: str, engine: str | None = None) -> None:
    exit_with_parent()
    claim_stdout()
    if engine is None:
        recipe = TrainingRecipe(WorkerSpec.read(Path(spec_path)))
        recipe.setup()
    else:
        # Started before the run's tokenization (tasks.train.start_worker_early): the engine's libraries are
        # imported (unless a warm worker did that already) and the model loaded while the rows are tokenized and
        # gated; the rest waits for worker.go, which the train task writes once the gates passed.
        from tasks.engines import load_engine

        load_engine(engine)
        waited = wait_for(Path(spec_path))
        recipe = TrainingRecipe(WorkerSpec.read(Path(spec_path)))
        recipe.startup["waited_for_spec_s"] = round(waited, 2)
        recipe.setup(rest=False)
        recipe.startup["waited_for_rows_s"] = round(wait_for(recipe.run.worker_go), 2)
        recipe.setup(model=False)
    recipe.startup["warm"] = processes.runs_warm()
    recipe.train()


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[3] if sys.argv[2:3] == ["--engine"] else None)
    except SftflowError as exc:  # bad input (config, model): reported, not retried
        emit(ErrorEvent(message=str(exc)))
        sys.exit(2)
