"""The harness's Hydra sweeper (Hydra loads plugins only from the `hydra_plugins` package)."""
