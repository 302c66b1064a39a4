"""`pssr bench-kernels`: parse options, run the bench pipeline, print its table."""

import click

from pssr import bench


def _shapes(ctx, param, values):
    try:
        return tuple(bench.parse_shape(v) for v in values) or bench.DEFAULT_SHAPES
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _ops(ctx, param, value):
    try:
        return bench.parse_ops(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("bench-kernels")
@click.option("--shape", "shapes", multiple=True, callback=_shapes, metavar="BxCxHxW",
              help="Input shape (repeatable). Default: 256x1x28x28, 1024x3x32x32 and 64x3x224x224.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(bench.MODES),
              help="pixel_surgery mode (repeatable). Default: mean and topk.")
@click.option("--dtype", type=click.Choice(list(bench.DTYPES)), default="float32", show_default=True,
              help="Dtype of x and grad.")
@click.option("--device", type=click.Choice(bench.DEVICES), default="all", show_default=True,
              help="Where to run; 'all' is the CPU plus CUDA when available.")
@click.option("--ops", "op_names", default="surgery,score", callback=_ops, show_default=True,
              help="Comma-separated ops: surgery (pixel_surgery), score (saliency_score).")
@click.option("--min-run-time", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
              help="Seconds of timing per measurement (torch.utils.benchmark blocked_autorange).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random x and grad.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch.set_num_threads(N) before timing. Default: torch's own choice.")
@click.option("--no-compiled", is_flag=True, help="Skip torch.compile of the reference (slow to compile on CPU).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write {machine, config, records} as JSON to this path (atomically).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (it is also off when stderr is not a terminal).")
def bench_kernels(shapes, modes, dtype, device, op_names, min_run_time, seed, threads, no_compiled, json_path, quiet):
    """Time the fused pssr ops against the eager and torch.compile'd reference.

    \b
    Each fused op (pssr.ops.pixel_surgery, pssr.ops.saliency_score) is first
    checked to be bit-identical to the reference, then timed; the table shows
    the median time of each implementation (fused, eager, compiled) and:
      GB/s         bytes the op must read + write / median time
                   (pixel_surgery: x, grad, x_surgered, the bool mask;
                    saliency_score: grad, the score);
      vs eager     eager median / fused median (> 1: fused is faster);
      vs compiled  torch.compile(reference) median / fused median;
      of copy      GB/s / the GB/s of dst.copy_(src) on the same device,
                   dtype and shape, with src as large as x and grad together
                   (bytes read + written): how close to memory bandwidth.
    """
    config = bench.Config(
        shapes=shapes, modes=modes or bench.MODES, dtype=dtype, device=device, ops=op_names,
        min_run_time=min_run_time, seed=seed, compiled=not no_compiled, threads=threads,
    )
    try:
        result = bench.run(config, json_path=json_path, quiet=quiet)
    except bench.BenchError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(bench.format_report(result))
    if json_path and not quiet:
        click.echo(f"wrote {json_path}", err=True)
