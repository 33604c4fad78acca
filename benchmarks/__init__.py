"""Benchmarks and probes: tools that measure the product, not part of it (never installed).

Each is one command from the repository root, e.g. ``python -m benchmarks.models --help``; every
one prints ratios measured side by side in one run (docs name the numbers and where they came from).
"""

import argparse


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The model-shape options the model benchmarks share (each overrides its ``--size`` preset)."""
    p.add_argument("--hidden", type=int, help="hidden size")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--intermediate", type=int, help="feed-forward size")
    p.add_argument("--layers", help="l,x,r layer counts, e.g. 9,5,5")
    p.add_argument("--tokens", type=int, help="text length T")
    p.add_argument("--regions", type=int, help="regions R")
    p.add_argument("--feat-dim", type=int, help="region feature size F")
    p.add_argument("--answers", type=int, help="answer classes A")
