"""The `pssr` command group: each subcommand parses options, calls one pipeline, prints.

Subcommands are imported only when one runs (click's lazy-group pattern): each pulls in torch and
its pipeline, which takes seconds, so `pssr --help`, `pssr --version` and a typo in a command name
import none of them. The group's help lists each command with the first sentence of its help,
kept here (`COMMANDS`); `tests/test_cli_startup.py` checks that it matches the command's own.
"""

import importlib

import click

from pssr import __version__

# name -> (module:attribute of the click command, the start of its help text as in its docstring)
COMMANDS = {
    "bench-kernels": ("pssr_cli.bench_kernels:bench_kernels",
                      "Time the fused pssr ops against the eager and torch.compile'd reference."),
    "eval": ("pssr_cli.eval:eval_command",
             "Clean and robust accuracy of a classifier behind each defense, under each attack and threat model."),
    "purify": ("pssr_cli.purify:purify_command",
               "Purify every image under IN into OUT, keeping the relative paths."),
    "train": ("pssr_cli.train:train_command",
              "Train a PSSR purifier for a frozen classifier from CONFIG: a preset (mnist, cifar10, "
              "mnist-adaptive) or a YAML file."),
    "train-classifier": ("pssr_cli.train_classifier:train_classifier_command",
                         "Train a classifier of the zoo from CONFIG: a preset (mnist, cifar10, mnist-robust, "
                         "cifar10-robust, mnist-ablation, cifar10-ablation) or a YAML file."),
}


def short_help(text: str, limit: int) -> str:
    """What click lists for a command whose help is ``text``."""
    return click.Command(None, help=text).get_short_help_str(limit)


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use (click docs, "Lazily Loading Subcommands")."""

    def __init__(self, *args, lazy: dict[str, tuple[str, str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy)

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx, name):
        if name not in self.commands and name in self.lazy:
            module, _, attr = self.lazy[name][0].partition(":")
            command = getattr(importlib.import_module(module), attr)
            if not isinstance(command, click.Command):  # pragma: no cover - a wrong table entry
                raise TypeError(f"{self.lazy[name][0]} is not a click command")
            self.add_command(command, name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        """Click's listing, from the help texts above, so that the group's help imports no command."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            if name in self.commands or name not in self.lazy:
                command = self.get_command(ctx, name)
                if command is None or command.hidden:
                    continue
                rows.append((name, command.get_short_help_str(limit)))
            else:
                rows.append((name, short_help(self.lazy[name][1], limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pssr")
def cli():
    """pssr: purify images against adversarial attacks (Pixel Surgery + Semantic Regeneration)."""


if __name__ == "__main__":  # `python -m pssr_cli.main` (torchrun runs modules this way)
    cli()
