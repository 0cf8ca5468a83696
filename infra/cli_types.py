"""Range-checked argument types shared by every command line (argparse ``type=``).

A flag's value is checked while the command line is parsed, before any file is read or any work starts, and a bad
value is a usage error that names the flag and the value, with exit status 2 and no traceback::

    error: argument --topk: must be an integer >= 1 (got '0')

The ranges:

* counts, lengths, batch sizes, depths, intervals: :data:`positive_int` (>= 1);
* worker counts, warm-up steps, margins: :data:`non_negative_int` (>= 0);
* seeds: :data:`seed` (0 .. 2**32 - 1, the range numpy's global ``np.random.seed`` accepts);
* rates and budgets: :data:`positive_float` / :data:`non_negative_float` (finite);
* lengths of token rows, cls and sep included: :data:`token_length` (2 .. :data:`MAX_TOKENS`);
* Adam/Lamb betas: :data:`beta` (``[0, 1)``);
* :func:`int_range` / :func:`float_range` build any other range.

A thread or worker count has no safe fixed bound (each costs memory; 10**12 would exhaust it), so the code caps it
at the machine's CPUs with :func:`at_most_cpus` where it is used.  :class:`CompactHelpFormatter` keeps the long
commands' ``--help`` within a screen or two.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import textwrap
from typing import Callable, Optional

logger = logging.getLogger(__name__)

SEED_LIMIT = 2 ** 32


def _parse(text: str, convert: Callable[[str], float], kind: str) -> float:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {kind} (got {text!r})") from None


def _describe(kind: str, low: Optional[float], high: Optional[float], low_open: bool = False,
              high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    return f"{kind} {'<' if high_open else '<='} {high}" if high is not None else kind


def int_range(low: Optional[int] = None, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type accepting the integers ``low <= value <= high`` (either bound may be None: unbounded)."""
    description = _describe("an integer", low, high)

    def parse(text: str) -> int:
        value = int(_parse(text, int, "an integer"))
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {description} (got {text!r})")
        return value

    parse.__name__ = description
    return parse


def float_range(low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
                high_open: bool = False) -> Callable[[str], float]:
    """An argparse type accepting finite numbers from ``low`` to ``high`` (each excluded when ``low_open`` /
    ``high_open``)."""
    description = _describe("a finite number", low, high, low_open, high_open)

    def parse(text: str) -> float:
        value = _parse(text, float, "a number")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {description} (got {text!r})")
        return value

    parse.__name__ = description
    return parse


integer = int_range()
positive_int = int_range(1)
non_negative_int = int_range(0)
seed = int_range(0, SEED_LIMIT - 1)
positive_float = float_range(0.0, low_open=True)
non_negative_float = float_range(0.0)
finite_float = float_range()
beta = float_range(0.0, 1.0, high_open=True)
# Widest token row (token memmaps are N x width int32, tokenized 2048 rows at a time): the bound where a tokenizer
# gives no model_max_length of its own.
MAX_TOKENS = 1 << 16
token_length = int_range(2, MAX_TOKENS)


def at_most_cpus(count: Optional[int], flag: str) -> Optional[int]:
    """``count`` threads or worker processes capped at this machine's logical CPUs, with a warning naming ``flag``
    when capped (more gain nothing on CPU-bound work, and each costs memory); None stays None."""
    cpus = os.cpu_count() or 1
    if count is None or count <= cpus:
        return count
    logger.warning("%s %d exceeds the %d CPUs of this machine: using %d", flag, count, cpus, cpus)
    return cpus


class CompactHelpFormatter(argparse.HelpFormatter):
    """``--help`` of a command with many flags: the usage line names the required arguments only, each value is
    shown by its kind (N: integer, X: number, its choices, else the last word of its name, e.g. PATH or DIR), help
    texts start at column 32, and each meaningful default is appended (not None, False or [], not a
    ``store_const`` flag's, not where the help speaks of its default)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 32,
                 width: Optional[int] = None):
        super().__init__(prog, indent_increment, max_help_position, width)

    def add_usage(self, usage, actions, groups, prefix=None) -> None:
        if usage is None:
            required = [self._usage_part(a) for a in actions if a.required or not a.option_strings]
            usage = "\n".join(textwrap.wrap(" ".join([self._prog, *required, "[options]"]),
                                             self._width - len("usage: "),
                                             subsequent_indent=" " * (len(self._prog) + 1), break_long_words=False,
                                             break_on_hyphens=False))
        super().add_usage(usage, actions, groups, prefix)

    def _usage_part(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return self._format_args(action, self._get_default_metavar_for_positional(action))
        return f"{action.option_strings[0]} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        kind = getattr(action.type, "__name__", "")
        if action.type is int or kind.startswith("an integer"):
            return "N"
        if action.type is float or kind.startswith("a finite number"):
            return "X"
        return action.dest.rsplit("_", 1)[-1].upper()

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.const is None \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text
