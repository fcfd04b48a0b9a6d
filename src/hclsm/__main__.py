"""``python -m hclsm`` (and ``torchrun -m hclsm``): the same command line as ``hclsm``."""
import sys

from hclsm.cli import main

sys.exit(main())
