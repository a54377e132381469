"""Command-line mistakes as one line, for both CLIs (``python -m data_pipeline`` and
``python -m launcher``): argparse's default prints its whole usage block first."""

from __future__ import annotations

import argparse
from typing import NoReturn


class UsageError(Exception):
    """Bad command line or input: reported as one line on stderr, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser (sub-commands included) whose errors raise UsageError naming
    where ``--help`` is, for the caller to print as one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")
