"""Argument types and the user-mistake error shared by kvtier's commands (``kvtier.cli`` and the
command modules under it, such as ``kvtier.advisor.command``). Standard library only."""

from __future__ import annotations

import argparse


class CommandError(Exception):
    """Raised by a command handler for a user mistake argparse cannot catch; exit 2."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def positive_int(text: str) -> int:
    """An integer of at least 1, for argparse's ``type=``."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {number}")
    return number


def port(text: str) -> int:
    """A TCP port, 1..65535, for argparse's ``type=``."""
    number = positive_int(text)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {number}")
    return number
