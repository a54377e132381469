# ruff: noqa: I001  (ops.torchvision_fix must be imported before anything that may import torchvision)
import ops.torchvision_fix  # noqa: F401

import sys

from data_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
