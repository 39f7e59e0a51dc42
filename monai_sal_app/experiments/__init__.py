"""Batch work over manifests and the studies: train, explain, evaluate, compare, and the experiment
runner (``runner``) that turns a recipe file of ``configs/experiments`` into results and a report."""
