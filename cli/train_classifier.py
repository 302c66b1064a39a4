"""`pssr train-classifier`: parse options, run the classifier-training pipeline, print the result."""

import click

from pssr import config, train_classifier
from pssr.checkpoint import CheckpointError
from pssr.data import DataError, short_name


@click.command("train-classifier")
@click.argument("config_source", metavar="CONFIG")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set train.epochs=2 (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run folder (state, log.jsonl, classifier.safetensors). Default: runs/classifier-<dataset>.")
@click.option("--data-root", type=click.Path(file_okay=False), envvar="PSSR_DATA_ROOT",
              help="Folder holding the data sets (also $PSSR_DATA_ROOT); a relative folder:PATH is under it.")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out exactly where it stopped.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or epoch lines (the JSONL log is still written).")
def train_classifier_command(config_source, overrides, out_dir, data_root, resume, quiet):
    """Train a classifier of the zoo from CONFIG: a preset (mnist, cifar10) or a YAML file.

    \b
    Data sets (data.dataset): mnist, cifar10, cifar100, or your own image
    folder as folder:PATH, which holds PATH/train/<class>/<image> and
    PATH/test/<class>/<image> (.png .jpg .jpeg .bmp .webp; one size; the
    classes are train/'s sorted sub-folders); PATH is under --data-root
    unless absolute. E.g.: pssr train-classifier mnist --data-root DIR
    --set data.dataset=folder:my-images --set model.arch=lenet

    Writes OUT/classifier.safetensors (weights, architecture, normalisation and test accuracy
    in its metadata), OUT/log.jsonl and OUT/state.safetensors (resume state, saved atomically
    every train.checkpoint_every steps, at each epoch's end, and at the next step boundary on Ctrl-C or SIGTERM).
    """
    try:
        cfg = config.load(train_classifier.ClassifierConfig, config_source, overrides, prefix="classifier")
        out_dir = out_dir or f"runs/classifier-{short_name(cfg.data.dataset)}"
        summary = train_classifier.run(cfg, out_dir, resume=resume, data_root=data_root, quiet=quiet)
    except (config.ConfigError, train_classifier.TrainError, DataError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    if "stopped_at_step" in summary:
        click.echo(f"stopped at step {summary['stopped_at_step']}/{summary['total_steps']}; "
                   f"state in {summary['state']} (rerun with --resume)")
    else:
        click.echo(f"test accuracy {summary['test_accuracy']:.2%} on {summary['test_images']} images "
                   f"in {summary['seconds']:.0f} s; wrote {summary['checkpoint']}")
