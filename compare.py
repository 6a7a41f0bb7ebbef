"""Compare registration methods on the same pairs: ``python compare.py -c configs/compare.yaml``.

Writes the Table-1-style Markdown table, per-pair CSV and a figure (see
``voxelopt/comparison/``).
"""

import sys

from voxelopt.comparison.cli import main

if __name__ == "__main__":
    sys.exit(main())
