"""The README's two commands: extracted, run by .ci/run exactly, and the first one run here in a fresh
virtual environment from a fresh copy of the repository (a non-editable install), followed by an op
on CPU tensors from that install. Also: every relative link in README.md and docs/ resolves."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import readme_commands  # noqa: E402

SMOKE = """
import sys, torch, jitkern
from jitkern.render import builtin_template_dir
assert jitkern.__file__.startswith(sys.prefix), jitkern.__file__  # the installed copy, not the checkout
x, w = torch.randn(4, 64), torch.randn(64)
y = jitkern.ops.rms_norm(x, w)
ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
print("templates:", builtin_template_dir())
"""


def test_readme_has_the_two_one_line_commands():
    cmds = readme_commands.commands()
    assert list(cmds) == ["first", "second"], cmds
    assert "pip install" in cmds["first"] and "jitkern " in cmds["first"]
    assert "pytest" in cmds["second"]


def test_ci_runs_exactly_the_readme_commands():
    ci = (REPO / ".ci" / "run").read_text()
    for name in ("first", "second"):
        assert f'eval "$(python3 tools/readme_commands.py {name})"' in ci, name
    assert ci.index("readme_commands.py first") < ci.index("readme_commands.py second")
    assert "pytest" not in re.sub(r"(?m)^\s*#.*$", "", ci.split("readme_commands.py second")[0]), \
        ".ci/run must run the tests through the README's command only"


def test_readme_is_a_front_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 160
    for word in ("seed 0", "issue ", "floor", "these machines", "dev box"):
        assert word not in text, word


def test_every_relative_link_resolves():
    bad = []
    for md in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```|`[^`\n]*`", "", md.read_text(), flags=re.S)  # code is not links
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            if not (md.parent / target).exists():
                bad.append(f"{md.relative_to(REPO)} -> {target}")
    assert not bad, bad


def _fresh_copy(dst: Path) -> None:
    """The repository's tracked files (what a fresh clone has), copied from the working tree."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        names = [n for n in files.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts]
    for n in names:
        src = REPO / n
        if src.is_file():
            (dst / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / n)


@pytest.mark.skipif(not shutil.which("git"), reason="needs git to list the repository's files")
def test_first_command_in_a_fresh_venv_then_an_op_from_the_installed_package(tmp_path):
    repo = tmp_path / "clone"
    _fresh_copy(repo)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JITKERN_", "PYTHON", "VIRTUAL_ENV", "PIP_REQUIRE"))}
    env.update(JITKERN_CACHE_DIR=str(tmp_path / "cache"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    first = readme_commands.commands()["first"]
    r = subprocess.run(["bash", "-c", first], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "built" in r.stdout or "nothing to build" in r.stdout
    venv_python = repo / ".venv" / "bin" / "python"
    site = subprocess.run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # a stray top-level "templates" folder in site-packages must not hijack the built-in templates
    (Path(site) / "templates" / "rms_norm").mkdir(parents=True, exist_ok=True)
    r = subprocess.run([venv_python, "-c", SMOKE], cwd=tmp_path, env={**env, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "jitkern/_templates" in r.stdout and "Failed to initialize NumPy" not in r.stderr
    r = subprocess.run([repo / ".venv" / "bin" / "jitkern", "config", "--json"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and '"JITKERN_CACHE_DIR"' in r.stdout, r.stderr


def test_cli_reference_names_every_command_and_cache_action():
    import argparse

    from jitkern.cli import build_parser

    def subcommands(parser):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                return a.choices
        return {}

    doc = (REPO / "docs" / "cli.md").read_text()
    top = subcommands(build_parser())
    missing = [f"jitkern {c}" for c in top if f"### `jitkern {c}" not in doc]
    missing += [f"cache {a}" for a in subcommands(top["cache"]) if f"| `{a}" not in doc]
    assert not missing, f"document in docs/cli.md: {missing}"
