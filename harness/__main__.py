"""`python -m harness`: the Hydra app (see harness.app)."""

from harness.app import cli

if __name__ == "__main__":
    cli()
