#!/usr/bin/env python
"""Collect the runs of a study into a results table (the collector is mabn.lab.collect).

    python scripts/collect_results.py table2 runs/table2                 # -> results/table2.md
    python scripts/collect_results.py table2 runs/table2 --out results/table2.md \
        --title "Table 2" --notes results/table2.notes.md
    python scripts/collect_results.py table4 runs/table4 runs/table2 --seeds 0,1   # shared rows
    python scripts/collect_results.py figure1b runs/figure1b runs/table2 --seeds 0,1  # table + PNG
"""

import sys

from mabn.lab.collect import main

if __name__ == "__main__":
    sys.exit(main())
