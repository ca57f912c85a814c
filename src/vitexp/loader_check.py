"""`python -m vitexp.loader_check [overrides]`: which is the bottleneck of the run that a list
of `vitexp.train` overrides describes, its data loader or its training step? Prints one
line: each one's img/s and the loader workers that would keep up (`make gpu-check` runs the
same check; how it measures: `vitexp.training.bottleneck`). Without overrides it makes its
own data: 500 x 375 JPEGs in an image folder.
"""

from __future__ import annotations

import sys

from vitexp.training.bottleneck import check


def main(argv: list[str] | None = None) -> int:
    """This check alone, its one line."""
    print(check(list(sys.argv[1:] if argv is None else argv))["line"], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
