"""The benchmark's command line: `python -m tools.bench` (`make bench`), and `chatmeter bench`
in a source checkout. Light to import; the harness loads when it runs."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

DOCS = Path("docs")


def bench(
    ctx: typer.Context,
    quick: Annotated[
        bool, typer.Option(help="Short rounds and 300 streams, to iterate (writes no docs).")
    ] = False,
    postgres: Annotated[
        bool, typer.Option(help="Also measure throughput on a throwaway PostgreSQL.")
    ] = True,
    redis: Annotated[
        bool, typer.Option(help="Also measure with a throwaway Redis (throughput, stops).")
    ] = True,
    local: Annotated[bool, typer.Option(help="Also measure the local model's tokens/s.")] = True,
    streams: Annotated[
        int | None, typer.Option(help="Streams held open at once (default 2000).", min=1)
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Markdown report (default docs/benchmarks.md).")
    ] = None,
) -> None:
    """Measure chatmeter against a bare Starlette SSE floor and SPEC §9's bars."""
    from tools.bench.harness import BenchOptions
    from tools.bench.report import print_report, write_report
    from tools.bench.runner import run_bench

    console = Console()
    if shutil.which("wrk") is None:
        console.print("[red]wrk is not installed:[/red] apt-get install -y wrk (make bench does)")
        raise typer.Exit(2)
    if output is None and not quick:
        output = DOCS / "benchmarks.md"
    options = BenchOptions(
        quick=quick,
        postgres=postgres,
        redis=redis,
        local_model=local,
        streams=streams or (300 if quick else 2000),
    )
    with console.status("starting") as status:

        def progress(message: str) -> None:
            console.log(message)
            status.update(message)

        results = run_bench(options, str(ctx.obj), progress)  # the command line, from main
    print_report(results, console)
    if output is not None:
        plot = output.parent / "bench-concurrency.png"
        write_report(results, output, plot)
        console.print(f"wrote {output} and {plot}")


def main(argv: list[str], prog: str) -> None:
    """Run the command with `argv` (no program name); `prog` names it in help and reports."""
    app = typer.Typer(add_completion=False)
    app.command()(bench)
    command = typer.main.get_command(app)
    command.main(args=argv, prog_name=prog, obj=" ".join([prog, *map(shlex.quote, argv)]))
