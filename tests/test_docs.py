"""The docs cannot drift from the code: every `headstart ...` command line they show is parsed by the CLI's
own parser, every flag they name in a `headstart ...` snippet exists, the README stays short, the site's
navigation holds every page, and every public name has its place in the API reference.

`make docs` (run by `make test`) builds the site with `mkdocs build --strict`, which checks links, anchors
and the API reference's names; these tests need no MkDocs and run in about a second.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

import headstart
from headstart.cli import get_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)]
SHELL_FENCES = {"", "sh", "bash", "shell", "console", "text"}
SHELL_ENDS = {"|", "||", "&&", ";", ">", ">>", "2>", "&"}


def fenced_blocks(text: str):
    """(language, first line number, lines) of each fenced code block."""
    block, lang, start = None, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if fence and block is None:
            block, lang, start = [], fence.group(1).lower(), number + 1
        elif fence:
            yield lang, start, block
            block = None
        elif block is not None:
            block.append(line)


def headstart_args(line: str, anywhere: bool = False) -> list[str] | None:
    """The arguments after `headstart` (or `.../headstart`, `-m headstart`) in a shell line, up to a pipe or
    redirect; None when the line does not run headstart. In a code block the command is first on the line
    or what `-m` runs (not the word in a description); `anywhere` also finds it after a wrapper
    (`/usr/bin/time -v headstart train ...`), for inline code."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote: not a command line
        return None
    for i, token in enumerate(tokens):
        if (token == "headstart" or token.endswith("/headstart")) and (anywhere or i == 0 or tokens[i - 1] == "-m"):
            args = tokens[i + 1:]
            for j, arg in enumerate(args):
                if arg in SHELL_ENDS:
                    return args[:j]
            return args
    return None


def command_lines() -> list[tuple[str, list[str]]]:
    """Every headstart command line in a shell code block of the README and the docs: (where, arguments)."""
    found = []
    for page in PAGES:
        for lang, start, lines in fenced_blocks(page.read_text(encoding="utf-8")):
            if lang not in SHELL_FENCES:
                continue
            joined, first = "", None
            for offset, line in enumerate(lines):
                first = start + offset if first is None else first
                if line.rstrip().endswith("\\"):  # a continued line
                    joined += line.rstrip()[:-1] + " "
                    continue
                args = headstart_args(joined + line)
                if args is not None:
                    found.append((f"{page.relative_to(ROOT)}:{first}: {(joined + line).strip()}", args))
                joined, first = "", None
    return found


def parse(args: list[str]) -> str | None:
    """None when the CLI's parser accepts `args`, else what it said."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            get_parser().parse_args(args)
    except SystemExit as exc:
        return None if exc.code == 0 else err.getvalue().strip().splitlines()[-1]
    return None


COMMAND_LINES = command_lines()


def test_the_docs_show_command_lines():
    # The tour alone shows train, evaluate, predict, serve and export; a broken extraction finds none.
    assert len(COMMAND_LINES) >= 30
    shown = {args[0] for _, args in COMMAND_LINES if args}
    assert {"train", "evaluate", "predict", "serve", "export", "compare", "extract", "datasets"} <= shown


@pytest.mark.parametrize("where,args", COMMAND_LINES, ids=[w.split(":", 2)[0] + ":" + w.split(":", 2)[1]
                                                            for w, _ in COMMAND_LINES])
def test_every_command_line_in_the_docs_parses(where, args):
    assert parse(args) is None, f"{where}\n  the parser says: {parse(args)}"


def test_a_wrong_flag_or_choice_in_a_command_line_is_caught():
    assert headstart_args("headstart train data/fmnist --strategey fine-tune  # a typo") == [
        "train", "data/fmnist", "--strategey", "fine-tune"]
    assert "unrecognized arguments: --strategey" in parse(["train", "data", "--strategey", "fine-tune"])
    assert "invalid choice" in parse(["train", "data", "--strategy", "fine-tuning"])
    assert headstart_args("torchrun --nproc_per_node 2 -m headstart extract DATA | tee log") == ["extract", "DATA"]
    assert headstart_args("pip install 'headstart[serve]'") is None


def options_of() -> dict[str, set[str]]:
    """Each command's option strings ('' for the top level), from the parser."""
    parser = get_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = {"": {s for a in parser._actions for s in a.option_strings}}
    for name, command in sub.choices.items():
        options[name] = options[""] | {s for a in command._actions for s in a.option_strings}
    return options


def test_every_flag_in_an_inline_headstart_snippet_exists():
    """Prose shows commands inline too (`headstart train DATA --strategy feature-extraction --cv 5`); with
    placeholders in them they do not parse, but each flag they name must belong to that command."""
    options = options_of()
    wrong = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for span in (" ".join(s.split()) for s in re.findall(r"`([^`]+)`", text)):  # spans may wrap lines
            args = headstart_args(span, anywhere=True)
            if not args:
                continue
            command = args[0] if args[0] in options else ""
            for flag in (a.split("=", 1)[0] for a in args if a.startswith("-") and a not in ("-", "--")):
                if flag not in options[command]:
                    wrong.append(f"{page.relative_to(ROOT)}: `{span}` names {flag}, which "
                                 f"`headstart {command or ''}` does not have".replace("  ", " "))
    assert wrong == []


def test_readme_is_at_most_300_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move the detail into docs/"


def test_readme_links_lead_to_files():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#", 1)[0] for t in re.findall(r"\]\(([^)\s]+)\)", readme)
               if not t.startswith(("http://", "https://", "#"))]
    assert targets and [t for t in targets if not (ROOT / t).exists()] == []


def nav_pages() -> list[str]:
    """The pages mkdocs.yml's nav lists (its `- Title: page.md` entries)."""
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = config[config.index("\nnav:"):]
    return re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.M)


def test_the_nav_lists_every_page_and_only_pages_that_exist():
    listed = nav_pages()
    on_disk = sorted(p.relative_to(DOCS).as_posix() for p in PAGES if p.is_relative_to(DOCS))
    assert sorted(listed) == on_disk
    assert len(listed) == len(set(listed))


def test_every_public_name_is_in_the_api_reference():
    api = (DOCS / "reference" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: headstart\.[\w.]+\.(\w+)$", api, flags=re.M))
    missing = sorted(set(headstart.__all__) - {"__version__"} - documented)
    assert missing == [], f"add `::: module.name` for {missing} to docs/reference/api.md"


def test_benchmark_tables_are_included_not_retyped():
    page = (DOCS / "guides" / "benchmarks.md").read_text(encoding="utf-8")
    included = re.findall(r'^--8<-- "([^"]+)"$', page, flags=re.M)
    results = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks").glob("results-*.md"))
    assert results and sorted(included) == results
    # a row copied into a page by hand would go stale when `make bench` rewrites the file
    rows = {line for name in results for line in (ROOT / name).read_text(encoding="utf-8").splitlines()
            if line.startswith("| ") and re.search(r"\d", line)}
    copied = [f"{p.relative_to(ROOT)}: {line}" for p in PAGES for line in p.read_text(encoding="utf-8").splitlines()
              if line in rows]
    assert copied == []
