"""The ``monai-sal`` command (also ``python -m monai_sal_app``, e.g. under ``torchrun``).

Batch commands start again once with the batch memory allocator (``allocator``) before anything
heavy is imported; ``serve`` does not: the server keeps its own memory setting, and the models it
prepares are trained in processes that get the batch allocator.
"""

from __future__ import annotations

import sys

from monai_sal_app.allocator import restart_with_batch_allocator


def _command(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main() -> int:
    if _command(sys.argv[1:]) != "serve":
        restart_with_batch_allocator()
    from monai_sal_app.cli import main as run_command

    return run_command()


if __name__ == "__main__":
    sys.exit(main())
