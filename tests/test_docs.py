"""The documents stay true: links resolve, nothing points outside the repository,
the reference tables equal the code they describe, README's commands parse.

README.md and docs/*.md are read as GitHub renders them: links outside code,
headings slugged the way GitHub makes anchors. Nothing here runs a daemon or
contacts etcd: the quick start's commands are parsed by the tools' own argparse
parsers, not run (tests/integration/test_readme_walkthrough.py runs them).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import ipaddress
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.shell import shell_commands
from topoipam.client import cni_config
from topoipam.client.ctl_parser import build_parser as ctl_parser
from topoipam.client.ctl_parser import usage_problem
from topoipam.daemon.config import DaemonConfig
from topoipam.daemon.core.keys import KeySchema
from topoipam.daemon.main import build_parser as daemon_parser
from topoipam.proto import cniwire

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DOCUMENTS = [README, *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']*)["']""")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
EXPLICIT_ANCHOR = re.compile(r"""<a\s+(?:id|name)\s*=\s*["']([^"']+)["']""")


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code: what GitHub renders as links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, only word characters,
    spaces (as '-') and '-' kept."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    found: set[str] = set(EXPLICIT_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    for _, title in HEADING.findall(text):
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    text = prose(path.read_text())
    return LINK.findall(text) + HTML_LINK.findall(text)


def test_there_are_documents_to_check() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in DOCUMENTS}
    assert {"README.md", "docs/design.md", "docs/operations.md", "docs/cni.md", "docs/cli.md",
            "docs/performance.md"} <= names


def test_slugs_follow_github() -> None:
    assert slug("The seed's story with topoipamctl") == "the-seeds-story-with-topoipamctl"
    assert slug("Reading `ipam check` and fixing each finding") == (
        "reading-ipam-check-and-fixing-each-finding")
    assert slug("Consistency: why no address is handed out twice") == (
        "consistency-why-no-address-is-handed-out-twice")
    assert slug("Routed (ptp)") == "routed-ptp"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves_inside_the_repository(document: Path) -> None:
    wrong = []
    for target in links(document):
        if not target:
            wrong.append("an empty link")
            continue
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith("//"):
            wrong.append(f"{target}: leaves the repository (no scheme links at all)")
            continue
        path_text, _, anchor = target.partition("#")
        path = (document.parent / path_text).resolve() if path_text else document
        if path != ROOT and ROOT not in path.parents:
            wrong.append(f"{target}: above the repository root")
            continue
        if not path.exists():
            wrong.append(f"{target}: no such file")
            continue
        if anchor:
            if path.suffix != ".md":
                wrong.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(path):
                wrong.append(f"{target}: {path.relative_to(ROOT)} has no heading #{anchor}")
    assert wrong == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_bare_web_address_and_no_issue_numbers(document: Path) -> None:
    # GitHub turns a bare http(s) address in prose into a link; code is not linked.
    text = prose(document.read_text())
    assert re.findall(r"https?://\S+", text) == []
    assert re.findall(r"\b[Ii]ssues? \d+|(?<![\w&])#\d+\b", document.read_text()) == []


def test_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 350


# ------------------------------------------------------------------ the etcd keys

#: A sample argument for each parameter name of KeySchema's key builders.
SAMPLES: dict[str, object] = {
    "name": "x", "node": "x", "pool": "x", "handle_id": "x/y/z", "identity_id": "x",
    "value": "v", "cidr": ipaddress.ip_network("10.0.0.0/26"),
    "window": ipaddress.ip_network("10.0.0.0/22"), "address": ipaddress.ip_address("10.0.0.1"),
    "family": None,
}


def schema_kinds() -> set[str]:
    """The first segment after the prefix of every key KeySchema builds."""
    keys = KeySchema()
    kinds = set()
    for name, method in inspect.getmembers(KeySchema, inspect.isfunction):
        signature = inspect.signature(method)
        if name.startswith("_") or signature.return_annotation not in (
                "bytes", "tuple[bytes, bytes]"):
            continue  # the parsers (keys -> objects) and helpers
        params = [p for p in signature.parameters if p != "self"]
        unknown = [p for p in params if p not in SAMPLES]
        assert not unknown, f"KeySchema.{name}: give the test a sample for {unknown}"
        built = getattr(keys, name)(*(SAMPLES[p] for p in params))
        key = built[0] if isinstance(built, tuple) else built
        assert isinstance(key, bytes) and key.startswith(keys.prefix.encode() + b"/"), name
        kinds.add(key[len(keys.prefix) + 1:].decode().split("/")[0])
    return kinds


def section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def first_column(table_text: str) -> list[str]:
    """The first code span of every body row of the Markdown tables in ``table_text``."""
    return [match.group(1).replace("\\|", "|")
            for match in re.finditer(r"^\|\s*`((?:[^`\\]|\\.)*)`", table_text, re.M)]


def test_the_design_lists_every_kind_of_etcd_key() -> None:
    listed = [key.split("/")[0] for key in first_column(
        section(DOCS / "design.md", "## The etcd keys"))]
    assert len(listed) == len(set(listed)), listed
    kinds = schema_kinds()
    assert len(kinds) >= 16
    assert sorted(listed) == sorted(kinds)


def tracked_files(pattern: str) -> list[Path]:
    done = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                           pattern], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / name for name in done.stdout.split() if (ROOT / name).exists()]


def test_no_code_cites_a_document_the_repository_lacks() -> None:
    # Spelled in pieces so that this file does not cite it either.
    design_doc = re.compile("DESIGN" + r"(\s*§|\.md)")
    citing = [f"{path.relative_to(ROOT)}:{number}"
              for pattern in ("*.py", "*.sh")
              for path in tracked_files(pattern)
              for number, line in enumerate(path.read_text().splitlines(), 1)
              if design_doc.search(line)]
    assert citing == []


def test_the_sections_code_cites_exist() -> None:
    cited = [(path, document, anchor) for pattern in ("*.py", "*.sh")
             for path in tracked_files(pattern)
             for document, anchor in re.findall(r"((?:docs/[\w-]+|README)\.md)#([\w-]+)",
                                                path.read_text())]
    assert any(document == "docs/design.md" for _, document, _ in cited)
    assert [f"{path.relative_to(ROOT)}: {document}#{anchor}"
            for path, document, anchor in cited
            if anchor not in anchors(ROOT / document)] == []


# ------------------------------------------------------------------ reference tables

def test_cli_reference_is_what_the_parser_generates() -> None:
    spec = importlib.util.spec_from_file_location("generate_cli", DOCS / "generate_cli.py")
    assert spec is not None and spec.loader is not None
    generator: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    text = (DOCS / "cli.md").read_text()
    assert text == generator.rewritten(text), (
        "docs/cli.md is stale: run .venv/bin/python docs/generate_cli.py")


def test_cni_reference_lists_every_ipam_key() -> None:
    listed = first_column(section(DOCS / "cni.md", "## Configuration reference"))
    assert sorted(listed) == sorted(cni_config.IPAM_KEYS)


def test_cni_error_codes_are_the_wire_contract_table() -> None:
    rows = re.findall(r"^\| (\d+) \|", section(DOCS / "cni.md", "## Error codes"), re.M)
    codes = {value for name, value in vars(cniwire).items()
             if name.startswith("CNI_") and isinstance(value, int)}
    assert sorted(map(int, rows)) == sorted(codes)


def test_operations_lists_every_daemon_configuration_key() -> None:
    table = section(DOCS / "operations.md", "### Daemon configuration")
    listed = [key for row in re.findall(r"^\| (`[^|]*`) \|", table, re.M)
              for key in re.findall(r"`([^`]+)`", row)]
    fields = [f.name.replace("_", "-") for f in dataclasses.fields(DaemonConfig)]
    assert sorted(listed) == sorted(fields)


# ------------------------------------------------------------------ README's commands

def one_line(block: str) -> Iterator[str]:
    """The commands of a shell block on one line each, here-document bodies dropped."""
    for command, _ in shell_commands(block):
        yield " ".join(line.removesuffix("\\") for line in command)


def simple_commands(command: str) -> Iterator[list[str]]:
    """Split a command line at pipes and lists; drop redirections and assignments."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    tokens = iter(list(lexer))
    for token in tokens:
        if token in ("|", "||", "&&", ";", "&"):
            yield words
            words = []
        elif token in ("<", ">", ">>", "<<", "<<-", "2>", "&>"):
            next(tokens, None)  # the file or the here-document's delimiter
        elif not words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", token):
            continue  # an environment assignment before the program
        else:
            words.append(token)
    yield words


def readme_commands() -> list[list[str]]:
    blocks = re.findall(r"^```sh\n(.*?)^```", README.read_text(), re.M | re.S)
    return [words for block in blocks for command in one_line(block)
            for words in simple_commands(command) if words]


def test_the_quick_start_commands_are_ones_the_tools_accept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("TOPOIPAM_")]:
        monkeypatch.delenv(key)
    checked = {"topoipamctl": 0, "topoipamd": 0, "tests/run": 0}
    for words in readme_commands():
        program = os.path.basename(words[0])
        if program == "topoipamctl":
            try:
                args = ctl_parser().parse_args(words[1:])
            except SystemExit as exc:
                raise AssertionError(f"topoipamctl refuses {shlex.join(words)}") from exc
            assert usage_problem(args) is None, shlex.join(words)
        elif program == "topoipamd":
            try:
                daemon_parser().parse_args(words[1:])
            except SystemExit as exc:
                raise AssertionError(f"topoipamd refuses {shlex.join(words)}") from exc
        elif words[0] == "tests/run":
            assert os.access(ROOT / "tests" / "run", os.X_OK)
            assert "exec tests/run" in (ROOT / ".ci" / "run").read_text()
        else:
            continue
        checked[program if program in checked else words[0]] += 1
    assert checked["topoipamd"] >= 1 and checked["tests/run"] == 1, checked
    assert checked["topoipamctl"] >= 15, checked


def test_shell_commands_are_split_as_a_shell_would() -> None:
    block = ("export A=b   # note\n"
             "cat <<'EOF' | topoipamctl apply -f -\nkind: X\nEOF\n"
             "X=1 topoipamctl label nodes n \\\n  rack=0 --create\n")
    commands = [w for c in one_line(block) for w in simple_commands(c) if w]
    assert commands == [["export", "A=b"], ["cat"], ["topoipamctl", "apply", "-f", "-"],
                        ["topoipamctl", "label", "nodes", "n", "rack=0", "--create"]]
