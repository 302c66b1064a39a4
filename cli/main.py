"""The `pssr` command group: each subcommand parses options, calls one pipeline, prints."""

import click

from pssr import __version__

from .bench_kernels import bench_kernels
from .eval import eval_command
from .purify import purify_command
from .train import train_command
from .train_classifier import train_classifier_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pssr")
def cli():
    """pssr: purify images against adversarial attacks (Pixel Surgery + Semantic Regeneration)."""


cli.add_command(bench_kernels)
cli.add_command(eval_command)
cli.add_command(purify_command)
cli.add_command(train_command)
cli.add_command(train_classifier_command)


if __name__ == "__main__":  # `python -m pssr_cli.main` (torchrun runs modules this way)
    cli()
