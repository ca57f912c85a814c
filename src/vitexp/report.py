"""`python -m vitexp.report MULTIRUN_DIR`: a sweep's table and chart, laid out by what it swept.

Writes table.md (also printed), table.csv and table.png into MULTIRUN_DIR: the paper's
Table 8 for a sweep over position embeddings, its Figure 4 for one over `data.subset`, else
one row per combination of the swept values (`vitexp.analysis.tables` says how each is
laid out).
"""

from __future__ import annotations

import argparse

from vitexp.analysis.tables import report
from vitexp.training.cli import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "sweep_dir", help="a multirun directory, e.g. multirun/ablation_posemb/<date>"
    )
    args = parser.parse_args()
    run_cli(lambda: report(args.sweep_dir))


if __name__ == "__main__":
    main()
