"""`python -m vitexp.baselines [data=NAME] [data.key=value ...]`: logistic regression and an
RBF SVM on the raw pixels of a data config's splits (fitted on train + val, scored on
test; `vitexp.analysis.baselines`), printed beside the published numbers for that data
set. A bad override or missing data is one line (vitexp.training.cli.run_cli).
"""

from __future__ import annotations

import sys
import time

from vitexp.analysis.baselines import NAMES, PUBLISHED, pixel_baselines


def main(argv: list[str] | None = None) -> None:
    """The two baselines fitted on a data config's splits, beside the published numbers."""
    from vitexp.training.cli import run_cli

    run_cli(lambda: fit_and_print(list(sys.argv[1:] if argv is None else argv)))


def fit_and_print(overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from vitexp.config import CONFIG_DIR, register_configs, validate
    from vitexp.data import ImageDataModule

    register_configs()
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        c = validate(compose("train", overrides=overrides))
    data = ImageDataModule(c.data, (28, 28), [0.0] * 3, [1.0] * 3)
    data.setup("fit")
    start = time.time()
    fitted = pixel_baselines(*map(data.raw_split, ("train", "val", "test")))
    print(f"{c.data.name}: fitted on train + val, scored on test ({time.time() - start:.0f} s)")
    for name, acc in fitted.items():
        print(f"  {NAMES[name]:<42} {acc:.4f}  (here)")
    for name, acc in PUBLISHED.get(c.data.source, {}).items():
        print(f"  {name:<42} {acc:.4f}  (published)")


if __name__ == "__main__":
    main()
