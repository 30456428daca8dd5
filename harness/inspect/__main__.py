"""`python -m harness.inspect`: the Hydra app (see harness.inspect.app)."""

from harness.inspect.app import cli

if __name__ == "__main__":
    cli()
