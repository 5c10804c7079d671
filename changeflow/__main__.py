from changeflow.cli import app

if __name__ == "__main__":  # not when a spawned sink process imports the parent's main module
    app()
