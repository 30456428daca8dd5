"""`python -m harness`: the Hydra app (see harness.sweep)."""

from harness.sweep import cli

if __name__ == "__main__":
    cli()
