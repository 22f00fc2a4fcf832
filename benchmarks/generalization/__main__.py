"""``python -m benchmarks.generalization``."""

from . import main

main()
