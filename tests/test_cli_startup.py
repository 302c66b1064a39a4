"""`pssr --help` starts fast: the group imports its commands (and torch) only when one runs, and the
commands import IBM ART, torchattacks, matplotlib and scipy only where they are used."""

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from pssr_cli import main

HEAVY = ("torch", "art", "scipy", "matplotlib", "torchattacks")


def _modules_after(code: str) -> tuple[str, list[str]]:
    """Run ``code`` in a fresh interpreter; (its output, which of HEAVY it imported)."""
    probe = (f"import sys, json\n{code}\n"
             f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    *out, last = r.stdout.splitlines()
    return "\n".join(out), json.loads(last)


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--version"], ["no-such-command"]])
def test_group_help_version_and_typos_import_no_torch(args):
    out, heavy = _modules_after(
        "from click.testing import CliRunner\nfrom pssr_cli.main import cli\n"
        f"r = CliRunner().invoke(cli, {args!r})\nprint(r.output)\nassert r.exit_code in (0, 2), r.output")
    assert heavy == [], f"pssr {' '.join(args)} imported {heavy}"
    if args[0] in ("--help", "-h"):
        assert "train-classifier" in out and "Commands:" in out


def test_the_listing_is_what_the_commands_themselves_say():
    """COMMANDS' help texts must not drift from the commands': the lazy listing equals an eager group's."""
    eager = click.Group("pssr", help=main.cli.help, context_settings=main.cli.context_settings,
                        params=main.cli.params)
    ctx = click.Context(main.cli)
    for name in main.COMMANDS:
        command = main.cli.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name
        eager.add_command(command)
        assert main.short_help(main.COMMANDS[name][1], 200) == command.get_short_help_str(200)
    runner = CliRunner()
    lazy_help = runner.invoke(main.LazyGroup("pssr", help=main.cli.help, lazy=main.COMMANDS,
                                             context_settings=main.cli.context_settings, params=main.cli.params),
                              ["--help"], prog_name="pssr").output
    assert lazy_help == runner.invoke(eager, ["--help"], prog_name="pssr").output


@pytest.mark.parametrize("name", sorted(main.COMMANDS))
def test_every_command_help_still_works(name):
    r = CliRunner().invoke(main.cli, [name, "--help"], prog_name="pssr")
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"Usage: pssr {name} ")


@pytest.mark.parametrize("module", ["pssr_cli.train", "pssr_cli.eval", "pssr_cli.purify",
                                    "pssr_cli.train_classifier", "pssr_cli.bench_kernels", "pssr"])
def test_commands_import_no_art_scipy_matplotlib_or_torchattacks(module):
    """A command's one-line errors (a bad option, a missing file) cost torch's import and no more;
    ART alone took ~1.7 s here (it imports scipy.stats and all of its attacks)."""
    _, heavy = _modules_after(f"import {module}\nimport pssr.adapters" if module == "pssr" else f"import {module}")
    assert set(heavy) <= {"torch"}, f"import {module} imported {heavy}"


def test_art_purifier_still_reachable_on_first_use():
    out, heavy = _modules_after(
        "import pssr\nfrom pssr.adapters import ArtPurifier\n"
        "from art.defences.preprocessor.preprocessor import PreprocessorPyTorch\n"
        "assert pssr.ArtPurifier is ArtPurifier and issubclass(ArtPurifier, PreprocessorPyTorch)\n"
        "print(ArtPurifier.__module__ + '.' + ArtPurifier.__qualname__)")
    assert out == "pssr.adapters.ArtPurifier" and "art" in heavy
