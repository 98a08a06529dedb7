"""Studies that informed a decision (see research/README.md); run from the repository root as `python -m research.X`."""
