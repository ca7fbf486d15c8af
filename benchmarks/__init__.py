"""Benchmarks of HFF against Forward-Forward and backprop on the same timm backbone.

Run from the repository root as ``python -m benchmarks.<name>`` (inference, train_cost, accuracy); each prints a
Markdown table and writes ``results.md``, ``results.json`` and ``plot.png`` into ``benchmarks/results/<name>/``.
``benchmarks/gpu_all.sh`` runs the whole GPU set in one go.
"""
