"""``python -m lmforge`` is the ``lmforge`` command (torchrun needs a module: ``torchrun -m lmforge train``)."""

from lmforge.cli import main

# Guarded so that worker processes started with "spawn" can import this module without running the CLI.
if __name__ == "__main__":
    main()
