from changeflow.cli import app

app()
