from sftflow.cli import app

app()
