"""``python -m lmforge`` is the ``lmforge`` command (torchrun needs a module: ``torchrun -m lmforge train``)."""

from lmforge.cli import main

main()
