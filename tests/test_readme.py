"""The README's commands and reference stay true to the code."""

import re
import shlex
from pathlib import Path

import typer.main

from autotune.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one():
    install_and_search, tests = quick_start_commands()
    assert "autotune search" in install_and_search and "autotune best" in install_and_search
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci.splitlines()


def test_quick_start_search_arguments_are_accepted_by_the_cli():
    install_and_search, _ = quick_start_commands()
    search = install_and_search.split("autotune search", 1)[1].split("&&", 1)[0]
    command = typer.main.get_command(app).commands["search"]
    known = {opt for p in command.params for opt in p.opts}
    for token in shlex.split(search):
        if token.startswith("--"):
            assert token in known, token


def test_cli_reference_names_every_option_of_every_command():
    commands = typer.main.get_command(app).commands
    reference = README.split("## CLI reference", 1)[1]
    for name, command in commands.items():
        assert f"`autotune {name}`" in reference, name
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--") and opt != "--help":
                    assert f"`{opt}" in reference or f" {opt}" in reference or \
                        f"/{opt}" in reference, f"{name} {opt} missing from README"
