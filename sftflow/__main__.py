from sftflow.cli import app

app(prog_name="sftflow")  # as the console script: its usage lines, and shell completion's _SFTFLOW_COMPLETE
