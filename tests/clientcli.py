"""The command line of a test file that is also its own client: test_tftp.py and
test_tftp_limits.py run themselves inside the client's network namespace
(`python3 tests/test_NAME.py COMMAND SERVER ...`) to speak raw TFTP from there, and print what
they saw for the test to read."""

from __future__ import annotations

import argparse

#: The positional arguments of a download: the server's address and the file asked for.
DOWNLOAD = ("server", "name")


def command_line(
    description: str, commands: dict[str, tuple[str, tuple[str, ...]]]
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """A parser with one subcommand for each of `commands` (name: its help and its positional
    arguments), the one chosen in `args.command`; each subcommand's parser comes back too, for
    options of its own."""
    parser = argparse.ArgumentParser(description=description)
    chosen = parser.add_subparsers(dest="command", required=True)
    parsers: dict[str, argparse.ArgumentParser] = {}
    for name, (text, positionals) in commands.items():
        parsers[name] = sub = chosen.add_parser(name, help=text)
        for positional in positionals:
            sub.add_argument(positional)
    return parser, parsers
