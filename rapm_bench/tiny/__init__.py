"""The tiny world's own tooling, beside its assets (rapm_bench/assets/tiny/): `train` trains the shapes-world
teacher and the tiny evaluator that ship there and writes the world report (`rapm-bench tiny ...`).

The adapter that loads those weights is rapm_bench/worlds/tiny.py; this package trains and reports, so it may
use the evaluation (FID, the evaluator) without the adapter folder importing it.
"""
