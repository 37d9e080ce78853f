"""MkDocs hook: the pages that are generated from the code, so they cannot drift from it.

- `<!-- headstart:cli -->` becomes every command of `headstart.cli.get_parser()`: its usage and a
  table of its arguments (help, default, choices), read from argparse itself.
- `<!-- headstart:strategies -->` becomes the table of registered strategies and their traits, read from
  `headstart.strategies` (the registry `train`, `compare` and the CLI's choices read too).
- `<!-- headstart:modules -->` becomes every module of `src/headstart` with its docstring's first line.

The package is imported from this checkout's `src/`, whatever else is installed, so the site documents
the code it is built with.
"""

from __future__ import annotations

import argparse
import ast
import html
import sys
from pathlib import Path

MARKERS = ("<!-- headstart:cli -->", "<!-- headstart:strategies -->", "<!-- headstart:modules -->")
SRC = Path(__file__).resolve().parents[2] / "src"


def on_config(config, **kwargs):
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if MARKERS[0] in markdown:
        markdown = markdown.replace(MARKERS[0], cli_reference())
    if MARKERS[1] in markdown:
        markdown = markdown.replace(MARKERS[1], strategy_table())
    if MARKERS[2] in markdown:
        markdown = markdown.replace(MARKERS[2], module_table())
    return markdown


def _cell(text) -> str:
    """Text for one Markdown table cell: HTML-escaped, pipes escaped, on one line."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if action.default is False else "on"
    if action.default is None or action.default == argparse.SUPPRESS:
        return "—"
    return f"`{action.default}`"


def _names(action: argparse.Action) -> str:
    if action.option_strings:
        flags = ", ".join(action.option_strings)
        takes_value = action.nargs != 0
        metavar = action.metavar or action.dest.upper()
        return f"`{flags}{' ' + metavar if takes_value else ''}`"
    return f"`{action.metavar or action.dest}`"


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help as `--help` prints it: `%(default)s` and the like filled in by argparse itself."""
    if not action.help:
        return ""
    return argparse.HelpFormatter(parser.prog)._expand_help(action)


def _rows(parser: argparse.ArgumentParser, actions) -> list[str]:
    rows = ["| argument | what | default | choices |", "|---|---|---|---|"]
    for action in actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        choices = ", ".join(f"`{c}`" for c in action.choices) if action.choices else ""
        rows.append(f"| {_names(action)} | {_cell(_help(parser, action))} | {_default(action)} | {choices} |")
    return rows


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    """One table for the command's own arguments, then one per titled group (e.g. fine-tuning)."""
    own = [a for g in parser._action_groups if g.title in ("positional arguments", "options")
           for a in g._group_actions]
    lines = _rows(parser, own)
    for group in parser._action_groups:
        if group.title not in ("positional arguments", "options") and group._group_actions:
            lines += ["", f"**{_cell(group.title)}**", "", *_rows(parser, group._group_actions)]
    return lines


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage as `--help` prints it, wrapped at 72 columns (the width of a page) whatever the terminal."""
    formatter = argparse.HelpFormatter(parser.prog, width=72)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    first, *rest = formatter.format_help().strip().splitlines()
    prefix = len("usage: ")  # argparse indents the continuation lines under the program's name after it
    return "\n".join([first[prefix:], *(line[prefix:] for line in rest)])


def cli_reference() -> str:
    from headstart.cli import get_parser

    parser = get_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    lines = ["## headstart", "", parser.description or "", "", "```text", _usage(parser), "```", "",
             *_arguments(parser), ""]
    for name, command in sub.choices.items():
        lines += [f"## headstart {name}", "", _cell(helps.get(name, "")) + ".", "", "```text", _usage(command),
                  "```", "", *_arguments(command), ""]
    return "\n".join(lines)


def strategy_table() -> str:
    from headstart.strategies import get_strategy, list_strategies

    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    rows = ["| `--strategy` | what it does | trains the backbone | image-size rule | int8 | under torchrun "
            "| rows in `compare` |", "|---|---|---|---|---|---|---|"]
    for name in list_strategies():
        s = get_strategy(name)
        compared = ", ".join(f"`{row}`" for row, _ in s.compare) or "—"
        rows.append(f"| `{name}` | {_cell(s.summary)} | {yes(s.trains_backbone)} | {s.size_rule} | {yes(s.int8)} "
                    f"| {yes(s.torchrun)} | {compared} |")
    return "\n".join(rows)


def module_table() -> str:
    rows = ["| module | what it holds (its docstring's first line) |", "|---|---|"]
    for path in sorted(SRC.joinpath("headstart").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        first = doc.split("\n\n")[0]
        rows.append(f"| `{path.relative_to(SRC / 'headstart').as_posix()}` | {_cell(first)} |")
    return "\n".join(rows)
