"""`pssr purify`: parse options, run the folder-purification pipeline, print a summary."""

import sys

import click

from pssr import purify_folder


@click.command("purify")
@click.argument("in_dir", metavar="IN", type=click.Path())
@click.argument("out_dir", metavar="OUT", type=click.Path())
@click.option("--model", default="auto", show_default=True, metavar="auto|mnist|cifar10|PATH",
              help="auto: greyscale images (R = G = B everywhere) to the MNIST purifier, colour ones to "
                   "the CIFAR-10 purifier; mnist or cifar10: that shipped purifier for every image; "
                   "PATH: a purifier checkpoint (.safetensors, from pssr train; write ./mnist for a file "
                   "called mnist).")
@click.option("--classifier", "classifier_path", type=click.Path(), default=None, metavar="PATH",
              help="The purifier's classifier checkpoint (not with --model auto). By default the one it was "
                   "trained with is found beside it, through its training run's config.yaml, or shipped.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per batch.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (under torchrun, cuda "
              "means cuda:LOCAL_RANK).")
@click.option("--format", "fmt", type=click.Choice(purify_folder.FORMATS), default="png", show_default=True,
              help="png: lossless PNG, extension changed to .png; same: the input's format and name "
                   "(JPEG at quality 95, so lossy; WebP lossless).")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist (otherwise they are skipped).")
@click.option("--save-masks", is_flag=True,
              help="Also write NAME.mask.png and NAME.strip.png beside each output (see above), enlarged "
                   "max(1, 128 // size) times with nearest pixels: 4x for 28 and 32 px models, so the mask is "
                   "112x112 or 128x128 and the strip 448x112 or 512x128, plus a 28 px band of captions.")
@click.option("--labels", "labels", type=click.Path(dir_okay=False), default=None, metavar="FILE.csv",
              help="The true classes, as file,label rows (file relative to IN, label a class name of the "
                   "model: 0-9 for MNIST, airplane, automobile, ... for CIFAR-10), to print accuracy before "
                   "and after purification and record each label in the manifest. Default: IN/labels.csv if "
                   "present. Without a row, a file in a folder named like a class has that label.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=purify_folder.MAX_PIXELS, show_default=True,
              help="Images with more pixels (width x height) are not decoded but recorded as failed: a small "
                   "file can hold a huge image (a decompression bomb).")
@click.option("--trust-arch", is_flag=True,
              help="Let a classifier checkpoint that names its own architecture (package.module:factory) be "
                   "loaded: this imports and runs the module a checkpoint names; only for files you trust.")
@click.option("--profile", is_flag=True, help="Print the time per stage (decode, saliency, surgery, regeneration, "
              "classify, encode) and images/s at the end.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (it is also off when stderr is not a terminal).")
def purify_command(in_dir, out_dir, model, classifier_path, batch_size, device, fmt, overwrite, save_masks, labels,
                   max_pixels, trust_arch, profile, quiet):
    """Purify every image under IN into OUT, keeping the relative paths.

    \b
    Inputs: .png .jpg .jpeg .bmp .webp (any case) in IN and its sub-folders;
    other files (counted in the summary) and hidden ones are ignored. Any
    Pillow mode works: alpha is composited on white, 16-bit grey is used in
    full precision, palette/CMYK/... become RGB, a colour image becomes luma
    for a greyscale model and a grey one is repeated to RGB for a colour model.
    Size: each image is resized (bilinear, aspect ratio not kept) to the
    model's size (28x28 MNIST, 32x32 CIFAR-10) and the OUTPUT IS WRITTEN AT
    THE MODEL'S SIZE: it is exactly what was purified and classified.
    Every conversion is recorded per file in the manifest.

    \b
    OUT/manifest.jsonl has one JSON object per input file: path (relative
    to IN), status (ok, skipped, failed), error, model, removed_fraction,
    pred_before, pred_after, prob_before, prob_after (the predicted class's
    probability), class_before, class_after, seconds, conversions, output,
    mask, strip (paths relative to OUT; null without --save-masks), label.
    Outputs are written atomically and never replaced without --overwrite
    (status skipped, error "exists"): rerun the same command after an
    interruption (even kill -9) or a full disk to finish the rest. Files
    that cannot be decoded, or have more than --max-pixels pixels, are
    reported on stderr and recorded as failed; the exit status is then 1.

    \b
    The summary says how many predictions purification changed and, where
    the true classes are known, the accuracy before and after: from
    --labels FILE.csv (file,label rows; IN/labels.csv is read when present)
    or from folders named like the model's classes (IN/7/x.png for MNIST,
    IN/cat/y.png for CIFAR-10).

    \b
    --save-masks writes NAME.mask.png and NAME.strip.png beside each output
    NAME.png. Strip panels, left to right: the input as the model saw it,
    the mask (white = removed), the regenerated output, and |output - input|
    x4 clipped to 1 (white = a change of a quarter of the range or more;
    kept pixels are black); captioned below with the prediction before, the
    share removed, the prediction after and the label if known. A file is
    then skipped only when its output, mask and strip all exist; otherwise
    the missing ones are written.

    \b
    On several processes (rank R takes every WORLD-th file, manifest-rankR.jsonl):
      torchrun --nproc_per_node 2 -m pssr_cli.main purify IN OUT
    """
    options = purify_folder.Options(model=model, classifier=classifier_path, batch_size=batch_size, device=device,
                                    fmt=fmt, overwrite=overwrite, save_masks=save_masks, quiet=quiet,
                                    profile=profile, labels=labels, max_pixels=max_pixels, trust_arch=trust_arch)
    try:
        summary = purify_folder.run(in_dir, out_dir, options)
    except purify_folder.PurifyError as exc:
        raise click.ClickException(purify_folder.printable(" ".join(str(exc).split()))) from None
    if profile:
        click.echo(purify_folder.format_profile(summary), err=True)
    ignored = f", {summary.ignored} non-image files ignored" if summary.ignored else ""
    rank = f" (rank {summary.rank} of {summary.world})" if summary.world > 1 else ""
    click.echo(f"{summary.ok} ok, {summary.skipped} skipped, {summary.failed} failed{ignored}{rank}; "
               f"outputs in {summary.output}, manifest {summary.manifest}")
    if summary.purified:
        click.echo(purify_folder.printable(_what_happened(summary)))
    if summary.failed:
        sys.exit(1)


def _what_happened(summary) -> str:
    """One line: how many predictions purification changed, and accuracy where labels are known."""
    line = f"purification changed {summary.changed} of {summary.purified} predictions"
    if not summary.labelled:
        return line + " (no labels: IN/labels.csv, --labels FILE.csv or class folders would give accuracy)"
    n = summary.labelled
    source = f", labels from {summary.labels}" if summary.labels else ""
    return (line + f"; accuracy on {n} labelled images: {100 * summary.correct_before / n:.1f}% before, "
            f"{100 * summary.correct_after / n:.1f}% after{source}")
