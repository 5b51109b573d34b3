"""User-facing errors and the CLI wrapper that turns them into one line and exit code 2."""

from __future__ import annotations

import errno
import logging
import sys
from typing import Callable, NoReturn


USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake in what the user asked for: bad path, wrong config, too little data.

    The message is one sentence naming the problem and what to do about it. CLIs print it
    without a traceback and exit with `exit_code`: 2 for a user mistake; subclasses that refuse a
    result (a collapsed model, an inexact pass) use their own codes.
    """

    exit_code = USER_ERROR_EXIT_CODE


def fail(message: str) -> NoReturn:
    raise UserError(message)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Run a CLI entry point; a UserError becomes `error: <message>` on stderr and exit 2. The library's
    log lines (logging, logger `onnxquant`) go to stderr as plain lines."""
    logger = logging.getLogger("onnxquant")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(f"error: the disk filled up while writing ({exc.filename or 'output'}); nothing was kept; free some "
              "space or choose another output location", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
