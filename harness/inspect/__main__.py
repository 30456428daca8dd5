"""`python -m harness.inspect`: the Hydra app (see harness.inspect.app)."""

from harness.inspect.app import main

if __name__ == "__main__":
    main()
