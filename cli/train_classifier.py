"""`pssr train-classifier`: parse options, run the classifier-training pipeline, print the result."""

import os

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
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where to train (auto: CUDA when there is a GPU). Under torchrun each process takes cuda:LOCAL_RANK.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or epoch lines (the JSONL log is still written).")
def train_classifier_command(config_source, overrides, out_dir, data_root, resume, device, quiet):
    """Train a classifier of the zoo from CONFIG: a preset (mnist, cifar10, mnist-robust,
    cifar10-robust, mnist-ablation, cifar10-ablation) or a YAML file.

    \b
    Randomized ablation (Levine and Feizi): the ablation: block, e.g.
    --set ablation.keep=45 (off: 0), trains the base classifier of the
    `pssr eval --defense ablation` vote on images of which only keep random
    pixels survive (the -ablation presets: 45 on MNIST, 75 on CIFAR-10).

    \b
    Adversarial training: the adversarial: block (off in mnist and cifar10;
    the -robust presets turn it on), e.g. --set adversarial.method=pgd
    --set adversarial.eps=0.3. Methods: pgd (Madry et al.), n-fgsm (de Jorge
    et al.; one extra pass per step), trades (Zhang et al.; adversarial.beta).
    adversarial.watch_n training images are held back and attacked with PGD
    every adversarial.watch_every steps; the final checkpoint holds the best
    watched weights, and a collapse of robust accuracy (more than
    adversarial.collapse_points below the best) ends the run on them.

    \b
    Data sets (data.dataset): mnist, cifar10, cifar100, or your own image
    folder as folder:PATH, which holds PATH/train/<class>/<image> and
    PATH/test/<class>/<image> (.png .jpg .jpeg .bmp .webp; one size; the
    classes are train/'s sorted sub-folders); PATH is under --data-root
    unless absolute. E.g.: pssr train-classifier mnist --data-root DIR
    --set data.dataset=folder:my-images --set model.arch=lenet

    Writes OUT/classifier.safetensors (weights, architecture, normalisation and test accuracy
    in its metadata, and how it was trained), OUT/log.jsonl and OUT/state.safetensors (resume state,
    saved atomically every train.checkpoint_every steps, at each epoch's end, and at the next step
    boundary on Ctrl-C or SIGTERM). Distributed: torchrun --nproc-per-node N -m pssr_cli.main
    train-classifier ... (the same N to resume).
    """
    try:
        cfg = config.load(train_classifier.ClassifierConfig, config_source, overrides, prefix="classifier")
        out_dir = out_dir or f"runs/classifier-{short_name(cfg.data.dataset)}"
        with train_classifier.distributed_cleanup():
            summary = train_classifier.run(cfg, out_dir, resume=resume, data_root=data_root, quiet=quiet,
                                           device=device)
    except (config.ConfigError, train_classifier.TrainError, DataError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 speaks for all
    if "stopped_at_step" in summary:
        click.echo(f"stopped at step {summary['stopped_at_step']}/{summary['total_steps']}; "
                   f"state in {summary['state']} (rerun with --resume)")
        return
    click.echo(f"test accuracy {summary['test_accuracy']:.2%} on {summary['test_images']} images "
               f"in {summary['seconds']:.0f} s; wrote {summary['checkpoint']}")
    watch = summary["training"].get("watch")
    if watch:
        collapsed = summary["training"].get("collapsed_at_step")
        click.echo(f"{summary['training']['method']} training: best watched PGD-{watch['pgd_steps']} accuracy "
                   f"{watch['best_pgd_acc']:.2%} (clean {watch['best_clean_acc']:.2%}) on {watch['n']} held-back "
                   f"training images at step {watch['best_step']}; the checkpoint holds those weights"
                   + (f"; robust accuracy collapsed at step {collapsed}, which ended the run" if collapsed else ""))
