"""The foundation: what every layer above stands on, and which imports nothing of the project.

    errors      the domain exceptions (bad input is never retried; the message names the fix)
    atomic      files that appear whole or not at all; sha256 of a file
    settings    every SFTFLOW_* environment variable, read in one place
    workspace   the workspace directory, its top-level layout and its layout version
    artifacts   a pydantic model for every JSON file or message that crosses a stage boundary
    stores      datasets, drops, runs, registry, landing: the only code that knows where files live
    staging     the Arrow tables a flow run's tasks hand each other
    processes   the plumbing of the subprocesses that load models (environment, parent death, log tail)
"""
