"""Pruning methods: the validated prune config, the selection rules and scores, the PyTorch reference (oracle)."""
