"""Shared test set-up: the torchvision fix before anything imports timm, one thread."""

import ops.torchvision_fix  # noqa: F401  (must precede timm/torchvision imports)

# isort: split
import torch

# The CI machine has 2 cores; tests that start workers need the second one.
torch.set_num_threads(1)
