"""`make soak`: the full randomized reliability trial on a throwaway PostgreSQL server.

    .venv/bin/python -m tools.soak [--trials 1000] [--seed N] [--write docs/reliability.md]

Prints the report, writes it to --write, exits 1 if an invariant broke (the server log is
then kept and its path printed).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from chatmeter.db.migrate import upgrade
from tests.support.postgres import PostgresServer
from tools.soak.plan import SoakConfig
from tools.soak.trial import run_soak


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None, help="default: a fresh one")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--chats-per-user", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds of trials")
    parser.add_argument("--write", type=Path, default=None, help="write the report here")
    parser.add_argument("--command", default=None, help="the command to name in the report")
    parser.add_argument("--keep", action="store_true", help="keep the server log and trials")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(sys.argv[1:] if argv is None else argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    config = SoakConfig(
        trials=args.trials,
        seed=seed,
        users=args.users,
        chats_per_user=args.chats_per_user,
        concurrency=args.concurrency,
        time_limit=args.time_limit,
    )
    command = args.command or f"python -m tools.soak --trials {args.trials} --seed {seed}"
    # the fake Gemini's uvicorn logs every scripted drop as an error: expected here
    logging.getLogger("uvicorn.error").disabled = True
    print(f"soak: {config.trials} trials, seed {seed}", flush=True)
    began = time.time()
    work = Path(tempfile.mkdtemp(prefix="chatmeter-soak-"))
    postgres = PostgresServer()
    postgres.start()
    try:
        postgres.createdb("soak")
        url = postgres.url("soak")
        upgrade(url)
        report = asyncio.run(run_soak(url, work, config, command=command))
    finally:
        postgres.stop()
    # the whole run: PostgreSQL's start and the migrations too
    report.began, report.duration = began, time.time() - began
    text = report.markdown()
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
        print(f"soak: report written to {args.write}")
    if report.passed:
        if args.keep:
            print(f"soak: server log and trials.jsonl kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    print(f"soak: INVARIANTS BROKEN (seed {seed}); see {work}/server.log, trials.jsonl")
    return 1


if __name__ == "__main__":
    sys.exit(main())
