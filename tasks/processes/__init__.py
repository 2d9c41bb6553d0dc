"""The subprocess entry points: the processes that load models, launched by the tasks (never imported by
them), so that GPU memory is released when they exit, a kill is survived, Unsloth is imported before
transformers, and torchrun can start one per GPU.

    trainer     python -m tasks.processes.trainer RUN_DIR/worker_spec.json      (the train task)
    evaluator   python -m tasks.processes.evaluator RUN_DIR/evaluator_spec.json (the evaluate task)

Both read a spec (foundation.artifacts: WorkerSpec, EvaluatorSpec) and answer in artifacts of the same
module (the training process's WorkerEvent lines on stdout, the evaluator's EvalScores file).
"""
