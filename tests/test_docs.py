"""The documentation's commands stay true: every entry-point command line in the guides' code
blocks composes with Hydra (its groups, options and keys exist), as ``--cfg job`` would check, and
the blocks marked to run on a CPU run as written and print the figures their comments promise."""

import os
import re
import shlex
import subprocess
import sys
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


# A code block the docs mark with this comment runs on a CPU in seconds: the tests run it as written.
RUN_MARKER = "<!-- test: run -->"
# Figures a command's comment promises (26,126,644 or 154.88), which its output must show.
FIGURE = re.compile(r"\d{1,3}(?:,\d{3})+|\d+\.\d+")


def runnable_blocks() -> list[tuple[str, list[str]]]:
    blocks = []
    for page in sorted(DOCS.rglob("*.md")):
        for block in re.findall(re.escape(RUN_MARKER) + r"\n```bash\n(.*?)```", page.read_text(), re.S):
            blocks.append((page.relative_to(DOCS).as_posix(), [line for line in block.splitlines() if line.strip()]))
    return blocks


RUNNABLE = runnable_blocks()


def test_the_getting_started_loop_is_marked_to_run():
    assert "getting-started.md" in {page for page, _ in RUNNABLE}


@pytest.mark.slow
@pytest.mark.parametrize(("page", "lines"), RUNNABLE, ids=[f"{page}:{i}" for i, (page, _) in enumerate(RUNNABLE)])
def test_a_runnable_block_runs_as_written(tmp_path, page, lines):
    # `python` is this environment's interpreter, as for a reader with the project's venv activated.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for line in lines:
        command, _, comment = line.partition(" # ")
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{page}: `{command}` failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        for figure in FIGURE.findall(comment):
            assert figure in done.stdout, f"{page}: `{command}` promises {figure}, printed:\n{done.stdout[-3000:]}"
