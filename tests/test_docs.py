"""The README and docs/ stay true to the code: every `tp3 <command>` and `python scripts/<name>.py` line they show
names a command that exists and only flags that command takes (its argv parsed as `tp3` parses it), every file they
link exists, and no path of one machine (`/work/...`, `/tmp/...`) or of a folder outside the repository
(`../shared/...`) is left where a newcomer has none of them."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tp3_fastai.cli import COMMANDS, command_parser, main as tp3, parse_command

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {"run_all": "run", "train_mnist": "mnist", "finetune": "finetune", "predict": "predict",
           "pretrain": "pretrain", "label_efficiency": "label-efficiency", "receptive_field": "rf",
           "bench_freeze": "bench", "bench_mnist": "bench-mnist"}
# a command line: `tp3 <command>`, or a script of scripts/ (run by python, torchrun, accelerate launch, a shell)
COMMAND = re.compile(r"(?:^|[\s`(])(?:tp3 (?P<cmd>[a-z-]+)|(?:\S*python\S* |torchrun [^`\n]*?|accelerate launch "
                     r"[^`\n]*?|\$\(command -v tp3\) (?P<cmd2>[a-z-]+)|)(?P<script>scripts/[\w]+\.(?:py|sh)))"
                     r"(?P<args>[^`\n#|;&]*)")
INLINE = re.compile(r"`([^`\n]+)`")
MACHINE_PATH = re.compile(r"(?<![\w.~])(/work/|/tmp/(?!site\b)|/home/|/root/|\.\./shared)")


def _blocks(text: str) -> tuple[list[str], str]:
    """(the shell code blocks, the text outside every code block)."""
    blocks, prose, current = [], [], None
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current = [] if line.strip() in ("```", "```bash", "```sh") else False
            else:
                if current is not False:
                    blocks.append("".join(current))
                current = None
        elif current is None:
            prose.append(line)
        elif current is not False:
            current.append(line)
    return blocks, "".join(prose)


def _commands(text: str) -> list[tuple[str, str, str]]:
    """(command or script, the arguments as written, the line) of every command line in shell code blocks and
    inline code."""
    blocks, prose = _blocks(text)
    lines = [re.sub(r"(^|\s)#.*", "", line) for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    spans = lines + INLINE.findall(prose.replace("\n", " "))  # shell comments left out
    found = []
    for span in spans:
        for line in span.splitlines():
            for m in COMMAND.finditer(line):
                what = m.group("cmd") or m.group("cmd2") or m.group("script")
                found.append((what, m.group("args").strip(), line.strip()))
            for m in re.finditer(r'make demo ARGS="([^"]*)"', line):  # the main job's options through make
                found.append(("run", m.group(1), line.strip()))
    return found


DOC_COMMANDS = [(doc.relative_to(ROOT).as_posix(), *c) for doc in DOCS for c in _commands(doc.read_text())]


def test_the_docs_show_commands_of_every_kind():
    named = {SCRIPTS.get(Path(w).stem, w) for _, w, _, _ in DOC_COMMANDS}
    assert set(COMMANDS) <= named, set(COMMANDS) - named  # each command appears at least once
    assert len(DOC_COMMANDS) > 60


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_the_docs_name_has_its_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        tp3([command, "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: tp3 {command}")


def _options(command: str) -> set[str]:
    parser = command_parser(COMMANDS[command], f"tp3 {command}")
    return {o for a in parser._actions for o in a.option_strings if a.help != "==SUPPRESS=="}


PLACEHOLDER = re.compile(r"\.\.\.|\$|\[|\b[A-Z][A-Z0-9_]{2,}\b")  # `...`, `$A`, `[--bs 128]`, RUN_DIR, SEED, ...


@pytest.mark.parametrize("doc, what, args, line", DOC_COMMANDS, ids=[f"{d}: {l[:60]}" for d, _, _, l in DOC_COMMANDS])
def test_every_command_line_of_the_docs_parses(doc, what, args, line):
    if what.startswith("scripts/"):
        assert (ROOT / what).is_file(), f"{doc}: {line}: no {what}"
        command = SCRIPTS.get(Path(what).stem)
        if command is None:  # a shell script or a helper with its own arguments
            return
    else:
        assert what in COMMANDS, f"{doc}: {line}: no command tp3 {what}"
        command = what
    tokens = shlex.split(args.replace("'", "'\"'\"'") if args.count("'") % 2 else args)
    flags = [t.split("=", 1)[0] for t in tokens if t.startswith("--")]
    unknown = sorted(set(flags) - _options(command) - {"--help"})
    assert not unknown, f"{doc}: {line}: tp3 {command} has no {', '.join(unknown)}"
    if tokens and not PLACEHOLDER.search(args) and "--help" not in flags:
        parse_command(COMMANDS[command], tokens, f"tp3 {command}")  # values of the right type, nothing left over


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(ROOT).as_posix() for d in DOCS])
def test_no_path_of_one_machine_and_no_reference_outside_the_repository(doc):
    text = doc.read_text()
    found = [(text.count("\n", 0, m.start()) + 1, m.group(0)) for m in MACHINE_PATH.finditer(text)]
    assert not found, f"{doc.name}: lines {found}"


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(ROOT).as_posix() for d in DOCS])
def test_every_file_the_docs_link_exists(doc):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (doc.parent / target).exists(), f"{doc.name}: link to {target}"


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(ROOT).as_posix() for d in DOCS])
def test_every_test_the_docs_name_exists(doc):
    for path, name in re.findall(r"(tests/test_\w+\.py)(?:::\s*(\w+))?", doc.read_text()):
        assert (ROOT / path).is_file(), f"{doc.name}: {path}"
        if name:
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{doc.name}: {path}::{name}"
