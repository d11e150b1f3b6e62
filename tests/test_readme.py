"""The README stays a front door and cannot drift from the code: at most 250 lines, every relative
link in it and in docs/ points to a file (and heading) that exists, and every ``freedeploy``
command in its code blocks names a real subcommand with real options and valid option values."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from freedeploy.cli import cli

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_LINES = 250

_LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")
_FENCE = re.compile(r"^```")


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where brackets are not links."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m and not fenced:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(pages: list[Path]) -> list[str]:
    """'page: target (why)' for every relative link that points nowhere."""
    problems = []
    for page in pages:
        for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                problems.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{page.name}: {target} (no heading #{anchor} in {dest.name})")
    return problems


def code_blocks(text: str, languages: tuple[str, ...] = ("sh", "bash", "")) -> list[str]:
    """The command lines of fenced code blocks in ``languages``, backslash continuations joined."""
    out, block, lang = [], None, ""
    for line in text.splitlines():
        m = re.match(r"^```(\w*)\s*$", line.strip())
        if m and block is None:
            block, lang = [], m.group(1)
        elif m:
            if lang in languages:
                out += [ln.strip() for ln in "\n".join(block).replace("\\\n", " ").splitlines() if ln.strip()]
            block = None
        elif block is not None:
            block.append(line)
    return out


def _substituted(line: str) -> str:
    """``line`` with each shell command substitution ``$(...)`` (balanced) replaced by one word."""
    out, i = [], 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, j = 0, i + 1
            while j < len(line):
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                if depth == 0:
                    break
                j += 1
            out.append("SUBSTITUTED")
            i = j + 1
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def freedeploy_commands(text: str) -> list[list[str]]:
    """Every ``freedeploy ...`` invocation in the code blocks, as argument lists after the program."""
    out = []
    for line in code_blocks(text):
        try:
            words = shlex.split(_substituted(line), comments=True)
        except ValueError:
            continue
        for i, word in enumerate(words):
            if word == "freedeploy" or word.endswith("/freedeploy"):
                out.append(words[i + 1:])
                break
    return out


def _check_value(param: click.Parameter, value: str, ctx: click.Context) -> str | None:
    if isinstance(param.type, click.Path):  # paths are created by earlier commands
        return None
    try:
        param.type.convert(value, param, ctx)
    except click.BadParameter as exc:
        return f"{param.opts[0]} {value!r}: {exc.message}"
    return None


def command_problems(args: list[str]) -> list[str]:
    """What is wrong with ``freedeploy ARGS`` as the CLI defines it (empty: nothing)."""
    ctx = click.Context(cli)
    if not args or args[0].startswith("-"):
        return [f"no subcommand in {args}"]
    cmd = cli.get_command(ctx, args[0])
    if cmd is None:
        return [f"no subcommand {args[0]!r}"]
    sub = click.Context(cmd, parent=ctx, info_name=args[0])
    options = {o: p for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
    options.update({o: None for o in cmd.get_help_option_names(sub)})
    arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
    problems, positional, rest = [], 0, list(args[1:])
    while rest:
        word = rest.pop(0)
        if word.startswith("--") or (word.startswith("-") and len(word) == 2 and word != "-"):
            name, eq, value = word.partition("=")
            if name not in options:
                problems.append(f"{args[0]}: no option {name}")
                if not eq and rest and not rest[0].startswith("-"):
                    rest.pop(0)  # its value, most likely
                continue
            param = options[name]
            if param is None or param.is_flag or param.count:
                continue
            if not eq:
                if not rest:
                    problems.append(f"{args[0]}: {name} needs a value")
                    continue
                value = rest.pop(0)
            bad = _check_value(param, value, sub)
            if bad:
                problems.append(f"{args[0]}: {bad}")
        else:
            positional += 1
    wanted = sum(max(a.nargs, 1) for a in arguments if a.required)
    unbounded = any(a.nargs == -1 for a in arguments)
    most = None if unbounded else sum(max(a.nargs, 1) for a in arguments)
    if positional < wanted or (most is not None and positional > most):
        problems.append(f"{args[0]}: {positional} arguments given, it takes "
                        f"{wanted}{' or more' if unbounded else ''}")
    return problems


def test_the_readme_is_at_most_250_lines() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {MAX_LINES})"


def test_every_relative_link_points_to_a_file_and_heading() -> None:
    assert broken_links(PAGES) == []


def test_every_doc_page_is_linked_from_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in text]
    assert missing == [], f"README.md does not link {missing}"


def test_every_freedeploy_command_in_the_readme_is_one_the_cli_takes() -> None:
    commands = freedeploy_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 10  # the path, the device, the decoder, serving
    problems = [f"freedeploy {' '.join(args)}: {p}" for args in commands for p in command_problems(args)]
    assert problems == []


@pytest.mark.parametrize("page", [p.name for p in PAGES[1:]])
def test_every_freedeploy_command_in_the_docs_is_one_the_cli_takes(page: str) -> None:
    commands = freedeploy_commands((ROOT / "docs" / page).read_text(encoding="utf-8"))
    problems = [f"freedeploy {' '.join(args)}: {p}" for args in commands for p in command_problems(args)]
    assert problems == []


def test_every_make_target_and_script_in_the_readme_exists() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w.-]+):", makefile, flags=re.M))
    for line in code_blocks(README.read_text(encoding="utf-8")):
        words = shlex.split(line, comments=True)
        if words[:1] == ["make"]:
            assert set(w for w in words[1:] if "=" not in w) <= targets, line
        for w in words:
            if w.endswith(".py") and "/" in w:
                assert (ROOT / w).is_file(), line


def test_the_checks_catch_drift(tmp_path: Path) -> None:
    """The checks above fail on a broken link, a missing heading, a bogus option or subcommand."""
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Some heading\n")
    page.write_text("[a](missing.md) [b](other.md#no-such-heading) [c](other.md#some-heading)\n")
    assert broken_links([page]) == ["page.md: missing.md (no such file)",
                                    "page.md: other.md#no-such-heading (no heading #no-such-heading in other.md)"]
    assert command_problems(["train", "--modle", "vit-tiny"]) == ["train: no option --modle"]
    assert command_problems(["export", "runs/x", "--target", "trt-fp61"])[0].startswith("export: --target 'trt-fp61'")
    assert command_problems(["exprot", "runs/x"]) == ["no subcommand 'exprot'"]
    assert command_problems(["run"]) == ["run: 0 arguments given, it takes 2 or more"]
    assert command_problems(["calibrate", "b", "--select-exits", "--epsilon=0.05"]) == []
