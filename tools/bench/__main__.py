"""`python -m tools.bench [--quick] …`: the benchmark (`make bench`)."""

import sys

from tools.bench.cli import main

main(sys.argv[1:], "python -m tools.bench")
