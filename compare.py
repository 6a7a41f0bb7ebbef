"""Compare registration methods on the same pairs: ``python compare.py -c configs/compare.yaml``.

Writes the Table-1-style Markdown table, per-pair CSV and a figure (see ``models/compare.py``).
"""

import sys

from models.compare import main

if __name__ == "__main__":
    sys.exit(main())
