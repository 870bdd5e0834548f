"""The command-line parser every tool uses: `--help` shows every default, a usage error is one "error:"
line (exit status 2, like every other bad input), and an unknown or misspelt option is answered with the
option meant ("did you mean --run-dir?"), also where the tools' vocabulary once differed.
"""
from __future__ import annotations

import argparse
import difflib
import sys

# Spellings of other tools or of earlier versions -> this project's name for the same thing. Answered as
# "did you mean" when a tool does not take them (e.g. sample.py --results-dir: the run is --run-dir).
OTHER_SPELLINGS = {"--results-dir": "--run-dir", "--result-dir": "--run-dir",
                   "--progress": "--no-progress", "--quiet": "--no-progress", "--ref": "--eval-ref"}


NO_HELP = "\u200b"  # the help of an option given none: argparse formats only a non-blank help


def ref_images_argument(text: str) -> int | str:
    """--ref-images / --eval-ref-images: a positive count, or "all"."""
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of images or all, got {text!r}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written; every option's help ends with its default, unless the help
    already says it or there is none to say (a flag, or a default the help explains)."""

    def _get_help_string(self, action):
        text = "" if action.help == NO_HELP else action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or "default" in text.lower()
                or action.help is argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser with HelpFormatter, one-line usage errors, and "did you mean" for options it
    does not know."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._argv: list[str] = []

    def format_help(self) -> str:
        for action in self._actions:  # (argparse prints no help line, so no default, for an option without help)
            if action.help is None and action.option_strings:
                action.help = NO_HELP
        return super().format_help()

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def options(self) -> set[str]:
        return set(self._option_string_actions)

    def unknown_options(self) -> list[str]:
        """The options of the command line this parser does not take (nor any of its options abbreviates)."""
        found = []
        for arg in self._argv:
            if arg == "--":
                break
            flag = arg.split("=", 1)[0]
            if flag.startswith("--") and not any(o.startswith(flag) for o in self.options()):
                found.append(flag)
        return found

    def suggestion(self, flag: str) -> str | None:
        """The option of this parser most likely meant by `flag`."""
        meant = OTHER_SPELLINGS.get(flag)
        if meant in self.options():
            return meant
        close = difflib.get_close_matches(flag, sorted(o for o in self.options() if o.startswith("--")), n=1,
                                          cutoff=0.7)
        return close[0] if close else None

    def error(self, message):
        unknown = self.unknown_options()  # said first: a misspelt required option is also "required"
        if unknown:
            meant = self.suggestion(unknown[0])
            message = (f"unknown option {unknown[0]}" + (f"; did you mean {meant}?" if meant else "")
                       + f" (see {self.prog} --help)")
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)
