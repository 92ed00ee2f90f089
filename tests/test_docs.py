"""Every command shown in README.md and docs/ names options that exist, with values the
option rules accept, so the documentation cannot drift from the code. gankit commands are
parsed by gankit's own parser (and a train command's config resolved and validated); study
and benchmark commands must name an existing script and only flags it defines."""

import re
import shlex
from pathlib import Path

import pytest

from gankit import cli
from gankit.config import validate

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def shown_commands():
    """(page, command) for every line of every ```bash block."""
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                command = re.split(r"\s+#", line)[0].strip()
                if command and not command.startswith("#"):
                    yield page.relative_to(ROOT), command


COMMANDS = list(shown_commands())
GANKIT = [(p, c) for p, c in COMMANDS if c.startswith("gankit ")]
SCRIPTS = [(p, c) for p, c in COMMANDS if re.match(r"python3? (experiments|benchmarks)/", c)]


def test_the_pages_show_commands():
    assert len(GANKIT) >= 40 and any(c.startswith("gankit study ") for _, c in GANKIT)


@pytest.mark.parametrize("page,command", GANKIT, ids=[c[:60] for _, c in GANKIT])
def test_a_shown_gankit_command_parses_and_validates(page, command, capsys):
    argv = shlex.split(command)[1:]
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as stop:
        assert stop.code == 0, f"{page}: `{command}` does not parse: {capsys.readouterr().err.strip()}"
        return  # --help
    if args.command is cli.train_command and not args.resume and not args.config:
        config, _ = cli.resolve_train_config(args)
        validate(config)
    if args.command is cli.study_command:  # the study's own options, after its kind
        module = ROOT / "toolkit" / f"{cli.STUDIES[args.kind].split('.')[-1]}.py"
        assert_flags_defined(page, command, args.options, module.read_text())


@pytest.mark.parametrize("page,command", SCRIPTS, ids=[c[:60] for _, c in SCRIPTS])
def test_a_shown_script_exists_and_takes_its_flags(page, command):
    words = shlex.split(command)
    script = ROOT / words[1]
    assert script.is_file(), f"{page}: {words[1]} does not exist"
    # A thin script's study lives in the package under the same name.
    module = ROOT / "toolkit" / script.name
    assert_flags_defined(page, command, words[2:],
                         script.read_text() + (module.read_text() if module.is_file() else ""))


def assert_flags_defined(page, command, words, source: str) -> None:
    """Every --flag in `words` is defined in `source` or the shared study parser."""
    defined = source + (ROOT / "toolkit" / "studies.py").read_text()
    for flag in (w.split("=")[0] for w in words if w.startswith("--")):
        assert f'"{flag}"' in defined, f"{page}: `{command}` uses {flag}, which it does not define"


def test_the_python_api_page_runs_as_shown(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), {})
    assert (tmp_path / "runs" / "api" / "eval" / "last" / "metrics.json").is_file()


def test_every_page_links_to_files_that_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"
