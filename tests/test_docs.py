"""The README and docs/ as a reader follows them: every relative link and anchor resolves,
every image is there, and every `python -m vitexp.train` line they show composes into a
valid config (what `python -m vitexp.train --cfg job ...` checks, plus vitexp's own value
checks), so a renamed key or preset breaks this test, not a reader's first try."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

from vitexp.config import CONFIG_DIR, register_configs, validate

REPO = Path(CONFIG_DIR).parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside code fences and inline code, where links are links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's anchor for each heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    found = set()
    for title in re.findall(r"^#+ (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def links() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text())):
            if not re.match(r"[a-z]+:", target):  # http(s):, mailto: are not checked
                out.append((str(page.relative_to(REPO)), target))
    return out


@pytest.mark.parametrize("page,target", links())
def test_every_relative_link_and_anchor_resolves(page, target):
    path, _, anchor = target.partition("#")
    file = (REPO / page).parent / path if path else REPO / page
    assert file.resolve().exists(), f"{page}: link to {path}, which does not exist"
    if anchor:
        assert anchor in anchors(file), f"{page}: no heading with anchor #{anchor} in {file.name}"


def test_the_link_checker_catches_a_broken_link_and_anchor(tmp_path):
    page = tmp_path / "a.md"
    page.write_text("# Some Title: here\n\nSee [x](b.md) and [y](#some-title-here)\n")
    assert anchors(page) == {"some-title-here"}
    assert "#nowhere" not in anchors(page)
    assert LINK.findall(prose(page.read_text())) == ["b.md", "#some-title-here"]
    assert not (tmp_path / "b.md").exists()


def train_commands() -> list[tuple[str, str]]:
    """Every `python -m vitexp.train` command line in a code block: (page, command). A
    schematic line (with `...`) is not a command."""
    out = []
    for page in PAGES:
        for block in re.findall(r"^```(?:bash|sh)?\n(.*?)^```", page.read_text(), re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith("python -m vitexp.train") and "..." not in line:
                    out.append((str(page.relative_to(REPO)), line))
    return out


def overrides_of(command: str) -> list[str]:
    """The overrides of one command (Hydra's own flags dropped, a `<placeholder>` read as a
    path); a sweep (a,b,c or range) stands for its first value, as `-m`'s first job."""
    args = shlex.split(re.sub(r"<[^>]+>", "x", command.split("python -m vitexp.train", 1)[1]))
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--cfg", "-c", "--package", "-p", "--config-name", "-cn"):
            skip = True  # a flag that takes a value
        elif not arg.startswith("-"):
            kept.append(arg)
    parsed = OverridesParser.create().parse_overrides(kept)
    return [
        f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        if o.is_sweep_override()
        else o.input_line
        for o in parsed
    ]


def test_the_docs_show_the_commands_that_matter():
    shown = " ".join(c for _, c in train_commands())
    for preset in ("fashion_mnist", "fashion_table8", "pretrain_in21k", "finetune_in1k"):
        assert f"+experiment={preset}" in shown


@pytest.mark.parametrize("page,command", train_commands())
def test_every_train_command_in_the_docs_composes(page, command):
    register_configs()
    overrides = overrides_of(command)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        del cfg["hydra"]  # Hydra's own node, composed so hydra/launcher=... overrides resolve
    validate(cfg)


def test_a_command_with_a_renamed_key_does_not_compose():
    register_configs()
    GlobalHydra.instance().clear()
    overrides = overrides_of("python -m vitexp.train model.nosuchkey=1")
    with (
        pytest.raises(Exception, match="nosuchkey"),
        initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"),
    ):
        compose("train", overrides=overrides)
