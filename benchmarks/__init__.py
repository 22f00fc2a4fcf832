"""Benchmarks of peft-tsrs: what the regularizers cost (``overhead``) and whether they generalize better
(``generalization``). ``python -m benchmarks.run_all`` (``make bench``) runs both and writes ``benchmarks/results/``."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CONFIGS = os.path.join(ROOT, "configs")
