"""Reading the shell blocks of the documents: README's commands, as a reader pastes them."""

from __future__ import annotations

import re
from collections.abc import Iterator


def shell_commands(block: str) -> Iterator[tuple[list[str], list[str]]]:
    """The commands of a shell block, blank and comment lines dropped: each as its lines
    (joined while one ends in a backslash) and its here-document (body and terminator)."""
    lines = iter(block.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        command = [line]
        while command[-1].endswith("\\"):
            command.append(next(lines))
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)", "\n".join(command))
        body: list[str] = []
        if heredoc:
            for text in lines:
                body.append(text)
                if text.strip() == heredoc.group(1):
                    break
        yield command, body
