"""Benchmarks and probes: tools that measure the product, not part of it (never installed).

Each is one command from the repository root, e.g. ``python -m benchmarks.models --help``; every
one prints ratios measured side by side in one run (docs name the numbers and where they came from).
"""
