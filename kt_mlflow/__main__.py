"""``python -m kt_mlflow ARGS`` is ``kt ARGS`` (and what ``torchrun -m kt_mlflow`` starts)."""
import sys

from .cli import main

sys.exit(main())
