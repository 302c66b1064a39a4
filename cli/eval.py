"""`pssr eval`: parse options, run the evaluation pipeline, print its report."""

import click

from pssr import evaluate, report
from pssr.attacks import AttackError
from pssr.checkpoint import CheckpointError
from pssr.data import DataError
from pssr.defenses import DefenseError


@click.command("eval")
@click.option("--classifier", "classifier_path", type=click.Path(), metavar="PATH",
              help="Classifier checkpoint (.safetensors, from pssr train-classifier or "
                   "pssr.classifiers.export); its data set picks the attack presets (mnist: MNIST's, anything "
                   "else: CIFAR-10's). A checkpoint of your own architecture needs --trust-arch. Default with "
                   "--defense pssr:path=FILE: the classifier that purifier was trained with, found as pssr purify "
                   "finds it (beside it, through its training run's config.yaml, or shipped).")
@click.option("--dataset", default=None, help="Test data set (mnist, cifar10, cifar100, or folder:PATH, an image "
              "folder whose test/ split is used). Default: the checkpoint's.")
@click.option("--data-root", type=click.Path(), envvar="PSSR_DATA_ROOT",
              help="Folder holding the data sets (also $PSSR_DATA_ROOT); a relative folder:PATH is under it.")
@click.option("--defense", "defenses", multiple=True, metavar="SPEC",
              help="Defense, e.g. jpeg:quality=50, pssr or pssr:path=FILE, or randomized ablation's vote "
                   "ablation:keep=45,n=100 (for a classifier trained with the ablation: key; also attack_n=, "
                   "cert=, alpha=, score=all) (repeatable). Default: "
                   + ", ".join(evaluate.DEFAULT_DEFENSES) + " (pssr where a shipped purifier fits the classifier).")
@click.option("--attack", "attacks", multiple=True, metavar="SPEC",
              help="Attack, e.g. pgd or pgd:eps=0.1,steps=10 (repeatable). Default: the data set's presets. "
                   "Sparse threat models (Sparse-RS, score-based, 1000 queries; n_queries=, n_restarts=): sparse-rs "
                   "changes at most k = 10 pixels (sparse-rs:eps=24 for k = 24), sparse-rs-patch pastes one 5x5 "
                   "patch (sparse-rs-patch:eps=8 for 8x8); both run on the first --limit-expensive images.")
@click.option("--threat", "threats", multiple=True, type=click.Choice(evaluate.THREATS),
              help="Threat model (repeatable). Default: all.")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Test images (the first N) for clean accuracy and the cheap attacks.")
@click.option("--limit-expensive", type=click.IntRange(min=1), default=200, show_default=True,
              help="The first M of them for AutoAttack, Square, Sparse-RS, EOT runs and the tvm defense.")
@click.option("--eot", type=click.IntRange(min=1), default=8, show_default=True,
              help="Draws of a randomized defense per gradient in the eot threat model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds every run (deterministic on the CPU).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per batch.")
@click.option("--fold-batchnorm", is_flag=True,
              help="Run the classifier with each BatchNorm folded into its convolution, channels-last: the "
                   "same function up to float rounding, ~1.6x faster on the CPU (benchmarks/fold_batchnorm.py). "
                   "Digests still name the stored weights; the --state file records the choice.")
@click.option("--json", "json_path", type=click.Path(), default=None,
              help="Also write {config, classifier, records, clean, worst_case, seed} as JSON (atomically).")
@click.option("--markdown", "markdown_path", type=click.Path(), default=None,
              help="Also write the report as a markdown file (atomically).")
@click.option("--plot", "plot_path", type=click.Path(), default=None,
              help="Also write a PNG bar chart: accuracy per attack, grouped by defense, worst case included.")
@click.option("--examples", "examples_path", type=click.Path(), default=None,
              help="Also write a PNG grid: per attack, 3 test images clean | adversarial (transfer, made on the "
                   "classifier) | surgered (removed pixels in red) | regenerated, each with its prediction. "
                   "Needs the pssr defense.")
@click.option("--eps-curve", "eps_curve_path", type=click.Path(), default=None,
              help="Also write a PNG of robust accuracy against ε per defense, from every PGD run (give PGD at "
                   "several ε, e.g. --attack pgd:eps=0.1 --attack pgd:eps=0.2 --attack pgd); the strongest "
                   "threat model at each ε.")
@click.option("--state", "state_path", type=click.Path(), default=None, metavar="FILE",
              help="Resume file: each finished run is saved there (atomically); rerunning the same command "
                   "skips those runs and gives the same report (total seconds aside). Refused if the options differ.")
@click.option("--trust-arch", is_flag=True,
              help="Allow a classifier checkpoint that names its own architecture (package.module:factory) to import "
                   "that module and run that factory: it runs whatever code the file names, so pass it only for "
                   "checkpoints you trust. The zoo (lenet, resnet9, resnet18) needs no flag.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (it is also off when stderr is not a terminal).")
def eval_command(classifier_path, dataset, data_root, defenses, attacks, threats, limit, limit_expensive, eot,
                 seed, batch_size, fold_batchnorm, json_path, markdown_path, plot_path, examples_path, eps_curve_path, state_path,
                 trust_arch, quiet):
    """Clean and robust accuracy of a classifier behind each defense, under each attack and threat model.

    \b
    Threat models (every number is tagged with one):
      oblivious  adversarial examples made on the undefended classifier (once per
                 attack, reused for every defense), then purified and classified;
      bpda       the attack sees classifier(defense(x)), with a straight-through
                 backward through non-differentiable defenses (for PSSR: through
                 the surgery, then G and f) (not run for 'none': it equals
                 oblivious there);
      mask-fixed PSSR only, gradient-based attacks: the surgery's own gradient
                 (1 - mask, the mask held fixed), through the regenerator and f;
      soft-mask  PSSR only, gradient-based attacks: the surgery's threshold
                 relaxed to a sigmoid, differentiated through the saliency
                 gradient itself (full adaptive; on the first M images);
      eot        randomized defenses only (tvm, ablation), gradient-based attacks only:
                 gradients averaged over --eot draws of the defense.
    Per defense, the worst case counts an image as robust only if it is correct
    clean and survives every attack under every threat model.

    With --state FILE a long evaluation survives Ctrl-C, SIGTERM or a crash:
    rerun the same command to finish it.
    """
    try:
        classifier_path = classifier_path or _purifiers_classifier(defenses)
    except (DefenseError, CheckpointError) as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    config = evaluate.Config(
        classifier=classifier_path, dataset=dataset, data_root=data_root,
        defenses=defenses or evaluate.DEFAULT_DEFENSES, attacks=attacks, threats=threats or evaluate.THREATS,
        limit=limit, limit_expensive=limit_expensive, eot=eot, seed=seed, batch_size=batch_size,
        fold_batchnorm=fold_batchnorm,
    )
    try:
        result = evaluate.run(config, json_path=json_path, markdown_path=markdown_path, plot_path=plot_path,
                              state_path=state_path, examples_path=examples_path, eps_curve_path=eps_curve_path,
                              quiet=quiet, trust_arch=trust_arch)
    except (evaluate.EvalError, AttackError, DefenseError, DataError, CheckpointError) as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    except KeyboardInterrupt:
        if not state_path:
            raise
        raise click.ClickException(f"interrupted; the finished runs are in {state_path}: rerun the same command "
                                   "to finish") from None
    click.echo(report.format_table(result))
    if not quiet:
        for path in (json_path, markdown_path, plot_path, examples_path, eps_curve_path):
            if path:
                click.echo(f"wrote {path}", err=True)


def _purifiers_classifier(defenses) -> str:
    """Without --classifier: the classifier the --defense pssr:path=FILE purifier was trained with,
    found by ``pssr.purifier.find_classifier`` (the lookup pssr purify and the Python API use)."""
    from pssr.defenses import parse_defense
    from pssr.purifier import PssrDefense, find_classifier

    paths = []
    for text in defenses:
        d = parse_defense(text)
        if isinstance(d, PssrDefense) and d.path and d.path not in paths:
            paths.append(d.path)
    if not paths:
        raise click.ClickException("pass --classifier PATH (or --defense pssr:path=FILE, whose own classifier is "
                                   "then evaluated)")
    found = [find_classifier(p, hint="pass it with --classifier PATH") for p in paths]
    if len(set(found)) > 1:
        raise click.ClickException(f"the purifiers were trained with different classifiers ({found[0]}, "
                                   f"{found[1]}): pass --classifier PATH")
    return str(found[0])
