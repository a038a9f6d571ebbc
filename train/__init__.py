"""Distributed GEMM training loop that measures compute/communication overlap and contention.

Run as ``torchrun ... -m train --config FILE [--override key=value ...]``.

Importing this package (and ``train.config``, ``train.intervals``, ``train.metrics``) never
imports torch: the controller validates configs with them on machines without torch.
"""
