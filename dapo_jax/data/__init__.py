"""Datasets: the built-in synthetic arithmetic task (and, with the training loop, DAPO-Math-17k)."""
