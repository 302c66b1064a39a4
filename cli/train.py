"""`pssr train`: parse options, run the purifier-training pipeline, print the result."""

import os

import click

from pssr import config, train_purifier
from pssr.attacks import AttackError
from pssr.checkpoint import CheckpointError
from pssr.data import DataError, short_name


@click.command("train")
@click.argument("config_source", metavar="CONFIG")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set train.epochs=2 or --set surgery.alpha=2 (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run folder (state, log.jsonl, purifier.safetensors). Default: runs/purifier-<dataset>.")
@click.option("--data-root", type=click.Path(file_okay=False), envvar="PSSR_DATA_ROOT",
              help="Folder holding the data sets (also $PSSR_DATA_ROOT); a relative folder:PATH is under it.")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out exactly where it stopped.")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when there is a GPU), cpu or cuda; under torchrun cuda means cuda:LOCAL_RANK.")
@click.option("--trust-arch", is_flag=True,
              help="Allow a classifier checkpoint that names its own architecture (package.module:factory) to import "
                   "that module and run that factory: it runs whatever code the file names, so pass it only for "
                   "checkpoints you trust. The zoo (lenet, resnet9, resnet18) needs no flag.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or check lines (the JSONL log is still written).")
def train_command(config_source, overrides, out_dir, data_root, resume, device, trust_arch, quiet):
    """Train a PSSR purifier for a frozen classifier from CONFIG: a preset (mnist, cifar10, mnist-adaptive) or a YAML file.

    Adversarial examples are made against the undefended classifier with the training attack
    (PGD only), once for the training set (OUT/attack-cache.safetensors; data.cache=false:
    per step); adaptive.fraction re-attacks that share of each batch through the defense with
    the current G. Writes OUT/purifier.safetensors (G's weights, the surgery
    settings and the sha256 of the classifier it belongs to), OUT/log.jsonl and
    OUT/state.safetensors (resume state, saved atomically every train.checkpoint_every steps,
    at each epoch's end, and at the next step boundary on Ctrl-C or SIGTERM).

    \b
    On several processes or machines (each takes its share of every batch):
      torchrun --nproc_per_node 2 -m pssr_cli.main train mnist --out runs/p
    The classifier itself comes from `pssr train-classifier`, or is your own
    (pssr.classifiers.export; see docs/guide.md): --set classifier=PATH --trust-arch.

    \b
    Data (data.dataset, default the classifier's): mnist, cifar10, cifar100,
    or folder:PATH, an image folder with PATH/train/<class>/<image> and
    PATH/test/<class>/<image> (PATH under --data-root unless absolute).
    The attack presets of a folder data set are CIFAR-10's (L-inf 8/255):
    override with e.g. --set attack=pgd:eps=0.3,steps=10.
    """
    try:
        cfg = train_purifier.load_config(config_source, overrides)
        with train_purifier.distributed_cleanup():
            dataset = cfg.data.dataset or ("mnist" if "mnist" in cfg.classifier.lower() else "cifar10")
            out_dir = out_dir or f"runs/purifier-{short_name(dataset)}"
            summary = train_purifier.run(cfg, out_dir, resume=resume, data_root=data_root, quiet=quiet,
                                            device=device, trust_arch=trust_arch)
    except (config.ConfigError, train_purifier.TrainError, DataError, CheckpointError, AttackError) as exc:
        raise click.ClickException(str(exc)) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 speaks for all
    if "stopped_at_step" in summary:
        click.echo(f"stopped at step {summary['stopped_at_step']}/{summary['total_steps']}; "
                   f"state in {summary['state']} (rerun with --resume)")
    else:
        click.echo(f"purified accuracy on {summary['watch_n']} test images: clean {summary['watch_clean_acc']:.2%}, "
                   f"PGD (transfer) {summary['watch_pgd_acc']:.2%}; {summary['seconds']:.0f} s; "
                   f"wrote {summary['checkpoint']}")
