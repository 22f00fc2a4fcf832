"""``python -m benchmarks.overhead``."""

from . import main

main()
