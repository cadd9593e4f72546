"""The AnyFlow algorithm in pure PyTorch + diffusers.

This package must import without Ray, DeepSpeed or MLflow (tests/test_layering.py
checks it), so the math can be tested, and reused, alone.
"""
