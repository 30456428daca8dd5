"""`python -m harness`: the Hydra app (see harness.run)."""

from harness.run import main

if __name__ == "__main__":
    main()
