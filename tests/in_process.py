"""Run ``lmforge`` verbs inside the test process: the CLI's own error handling, without an interpreter start-up."""

from __future__ import annotations

import torch

from lmforge.cli import main


def call_cli(*argv: str) -> int:
    """``lmforge ARGV`` in this process; returns its exit code (read stderr with capsys).

    Runs set ``train.threads``; torch's thread count is restored afterwards so later tests are unaffected.
    """
    threads = torch.get_num_threads()
    try:
        main(list(argv))
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        torch.set_num_threads(threads)
