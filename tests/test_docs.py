"""The documentation's commands stay true: every entry-point command line in the guides' code
blocks composes with Hydra (its groups, options and keys exist), as ``--cfg job`` would check."""

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from deblur_diffusion.cli import config_dir

DOCS = Path(__file__).parents[1] / "docs"
# Entry points that are Hydra applications, by module: their config's name.
HYDRA_APPS = {"train": "train", "evaluate": "evaluate", "predict": "predict", "generate_prior": "generate_prior", "summary": "summary"}


def documented_commands() -> list[tuple[str, str, list[str]]]:
    commands = []
    for page in sorted(DOCS.rglob("*.md")):
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                found = re.match(r"(?:\.venv/bin/)?python -m deblur_diffusion\.(\w+) ?(.*)", line.split("  #")[0].split(" # ")[0].strip())
                if found and found.group(1) in HYDRA_APPS:
                    # Placeholders (<...>, ..., $VARIABLES) stand for a value: any value composes.
                    arguments = re.sub(r"<[^>]*>|\$\{?\w+\}?|\.\.\.", "x", found.group(2))
                    commands.append((page.relative_to(DOCS).as_posix(), found.group(1), shlex.split(arguments)))
    return commands


COMMANDS = documented_commands()


def test_the_guides_hold_commands_of_every_entry_point():
    assert {module for _, module, _ in COMMANDS} == set(HYDRA_APPS)


@pytest.mark.parametrize(("page", "module", "arguments"), COMMANDS, ids=[f"{p}:{m}:{i}" for i, (p, m, _) in enumerate(COMMANDS)])
def test_a_documented_command_composes(tmp_path, page, module, arguments):
    overrides = [argument for argument in arguments if argument != "-m"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        compose(HYDRA_APPS[module], overrides=[*overrides, f"paths.root_dir={tmp_path}"])
