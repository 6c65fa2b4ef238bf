"""Training: optimisers, the local meta-training loop, evaluation and checkpoints."""
