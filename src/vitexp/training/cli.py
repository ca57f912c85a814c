"""What every vitexp command shares: one-line errors and exit codes, Hydra entry points.

Hydra prints composition errors over several lines with a hint about HYDRA_FULL_ERROR;
vitexp's commands print ONE line, `error: <what> ...`, and exit non-zero. With
HYDRA_FULL_ERROR=1 set by the user, the full traceback comes first; the line and the exit
code stay the same (scripts tell a config error, 2, from a divergence, 3, either way).
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitexp.errors import Terminated, is_user_error

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def preset_for_another_family(message: str) -> str | None:
    """`+experiment=pretrain_in21k model=bit_r50x1`: the preset sets a key the chosen model
    family lacks (a ViT's dropout on a ResNet). Say so, and name the family's own preset."""
    from vitexp.config import CONFIG_DIR

    found = re.search(
        r"In '(experiment/\w+)': ConfigKeyError.*?Key '(\w+)' not in '(\w+)'.*?full_key: (\S+)",
        message,
        re.S,
    )
    if not found:
        return None
    source, _, schema, full_key = found.groups()
    preset = source.partition("/")[2]
    family = schema.removesuffix("Config")
    own = f"{preset}_{family.lower()}"
    hint = (
        f"use +experiment={own}, the same recipe for {family}"
        if (Path(CONFIG_DIR) / "experiment" / f"{own}.yaml").is_file()
        else f"leave the model= override out, or write a preset for {family}"
    )
    return f"{source} sets {full_key}, which a {family} model does not have: {hint}"


def one_line(err: BaseException) -> str:
    """Turn any error (ours, Hydra's, OmegaConf's) into one line naming the culprit."""
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    if is_user_error(err):
        return _squash(str(err))
    if isinstance(err, MissingConfigException):
        match = re.search(r"Could not find '([^']+)'", str(err))
        group, _, option = (match.group(1) if match else "").rpartition("/")
        options = ", ".join(err.options or [])
        if group and options:
            return f"{group}={option} is not a known option; choose one of {options}"
        return _squash(str(err).split("\n\n")[0])
    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", "") or "a value"
        return f"{key} is not set; give it on the command line, e.g. {key}=..."
    if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
        message = str(err).split("\n")[0]
        if re.match(r"Key '.*' (is )?not in", message):
            parent = err.full_key.rpartition(".")[0] or "the top level"
            return (
                f"{err.full_key} is not a key of {parent}; check the spelling "
                "(`python -m vitexp.train --cfg job` lists every key)"
            )
        value = getattr(err, "value", None)
        shown = f"={value!r}" if value is not None else ""
        if "is not a subclass of" in message:  # a value given for a whole config node
            key = err.full_key
            return (
                f"{key}{shown}: {key} is a group of settings, not a value; set one of its keys "
                f"({key}.NAME=...) or pick a file of the group ({key.replace('.', '/')}=FILE)"
            )
        return f"{err.full_key}{shown}: {message}"
    if isinstance(err, ConfigCompositionException):
        if err.__cause__ is not None:
            return one_line(err.__cause__)
        return preset_for_another_family(str(err)) or _squash(str(err))
    text = str(err).strip().split("\n")[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


FORCED = "_VITEXP_FORCED_FULL_ERROR"  # set by us, inherited by DDP child processes


def wants_traceback() -> bool:
    """True when the user set HYDRA_FULL_ERROR=1 (not when vitexp forced it)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1" and FORCED not in os.environ


def exit_with(err: BaseException) -> None:
    """Print the one-line error (after the traceback, if the user asked for it) and exit: the
    error's own code (2 for a user error, 3 for a divergence, ...), 1 for anything else."""
    user_error = is_user_error(err) or type(err).__module__.startswith(("hydra", "omegaconf"))
    full = wants_traceback()
    if full:
        traceback.print_exception(err, file=sys.stderr)
    suffix = "" if user_error or full else " (HYDRA_FULL_ERROR=1 shows the traceback)"
    print(f"error: {one_line(err)}{suffix}", file=sys.stderr, flush=True)
    sys.exit(getattr(err, "exit_code", EXIT_USER_ERROR) if user_error else EXIT_FAILURE)


def single_run_errors(task: Callable) -> Callable:
    """Decorate a Hydra task: in a single run, an error becomes one line and an exit code
    (Hydra would add "Error executing job..." first). In a multirun the error goes back to
    Hydra, which runs the other jobs and then reports the failure."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except Exception as err:
            if in_multirun():
                raise
            exit_with(err)

    return wrapper


def in_multirun() -> bool:
    """Inside a job of a Hydra multirun (`-m`, a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def stop_on_sigterm() -> None:
    """From the first line on, SIGTERM raises `Terminated` (a KeyboardInterrupt, as Ctrl-C
    does) instead of ending the process without a word: the command says what it kept and
    exits 143. Inside `trainer.fit` Lightning's handler takes over (and calls this one too,
    which then leaves the stop to it)."""
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _raise_terminated)


def _raise_terminated(signum: int, frame: object) -> None:
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:  # not called by Lightning's
        raise Terminated


def run_cli(entry: Callable[[], object]) -> None:
    """Run a Hydra (or plain) entry point; print one line and exit non-zero on failure."""
    user_full = wants_traceback()
    if not user_full:
        os.environ["HYDRA_FULL_ERROR"] = "1"  # make Hydra raise instead of printing
        os.environ[FORCED] = "1"
    stop_on_sigterm()
    try:
        entry()
    except KeyboardInterrupt as err:  # its text, where it has one, says what was kept
        sigterm = isinstance(err, Terminated)
        said = str(err) or (
            f"stopped at once by {'SIGTERM' if sigterm else 'Ctrl-C'}; checkpoints are never "
            "left half-written: where a run has checkpoints/last.ckpt, resume it with "
            "ckpt_path=last"
        )
        print(f"error: {said}", file=sys.stderr, flush=True)
        sys.exit(143 if sigterm else 130)
    except Exception as err:
        exit_with(err)


def hydra_command(config_name: str, schema: type, task: Callable[[Any], object]) -> None:
    """Run `task` on the typed config `configs/<config_name>.yaml` (whose defaults name the
    schema `<config_name>_schema`) as a command line: Hydra overrides, one-line errors."""
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from vitexp.config import CONFIG_DIR

    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
    @single_run_errors
    def _main(cfg) -> None:
        task(OmegaConf.to_object(cfg))

    run_cli(_main)
