"""The README and docs/ as a reader meets them: every relative link resolves, and every cheap command they print
(`--help`, `--print_config`, `DRY_RUN=1`) runs as printed from the checkout."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "benchmarks" / "README.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
FENCE = re.compile(r"```(?:bash|sh)?\n(.*?)```", re.DOTALL)
CHEAP = ("--help", "--print_config", "DRY_RUN=1")


def printed_commands(page: Path) -> list[str]:
    """The commands of a page's fenced shell blocks, continuation lines joined and comments dropped."""
    commands = []
    for block in FENCE.findall(page.read_text()):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(line)
    return commands


def cheap_commands() -> list[tuple[str, str]]:
    """(first page that prints it, command) for each distinct cheap command."""
    found: dict[str, str] = {}
    for page in PAGES:
        for command in printed_commands(page):
            if any(word in command.split() or command.startswith(word) for word in CHEAP):
                found.setdefault(command, page.relative_to(ROOT).as_posix())
    return [(page, command) for command, page in found.items()]


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links that do not resolve:\n" + "\n".join(broken)


def test_the_cheap_commands_are_found():
    found = cheap_commands()
    assert any("--print_config" in command for _, command in found)
    assert any(command.startswith("DRY_RUN=1") for _, command in found)


@pytest.mark.parametrize("page, command", cheap_commands(), ids=lambda value: value[:60])
def test_printed_command_runs(page, command, tmp_path):
    if not (ROOT / ".venv" / "bin" / "lightning-mim").exists():
        pytest.skip("the commands are printed for the checkout's .venv (make install)")
    environment = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{page}: `{command}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
