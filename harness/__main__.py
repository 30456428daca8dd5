"""`python -m harness`: the Hydra app (see harness.run)."""

from harness.run import cli

if __name__ == "__main__":
    cli()
