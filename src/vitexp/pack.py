"""`python -m vitexp.pack src=PATH out=DIR [key=value ...]`: an image folder, parquet files
or a Hugging Face dataset -> Lightning's litdata chunks, which `data=litdata data.root=DIR`
trains from. Interrupted, the same command finishes it (`vitexp.data.pack` says how).
"""

from __future__ import annotations

from vitexp.data.pack import PackCommandConfig, pack


def main() -> None:
    from vitexp.training.cli import hydra_command

    hydra_command("pack", PackCommandConfig, pack)


if __name__ == "__main__":
    main()
