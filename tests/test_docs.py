"""The documentation's commands stay true: every entry-point command line in the guides' code
blocks composes with Hydra (its groups, options and keys exist), as ``--cfg job`` would check, and
the blocks marked to run on a CPU run as written and print the figures their comments promise."""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from deblur_diffusion.cli import config_dir
from deblur_diffusion.planning import training_plan

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
# Every place a user reads a command: the front page, the guides, the experiment notes and the
# cluster files.
SOURCES = [
    ROOT / "README.md",
    *sorted(DOCS.rglob("*.md")),
    *sorted(p for p in (ROOT / "experiments").rglob("*") if p.suffix in (".md", ".sbatch", ".sh")),
]
# Entry points that are Hydra applications, by module: their config's name.
HYDRA_APPS = {
    "train": "train",
    "evaluate": "evaluate",
    "predict": "predict",
    "generate_prior": "generate_prior",
    "summary": "summary",
    "app": "app",
    "export": "export",
    "data.synthesize": "synthesize",
    "data.prepare": "prepare",
}
# make targets (Makefile): the module they run and the arguments they add before ARGS.
MAKE_TARGETS = {
    "quickstart": ("train", ["experiment=quickstart"]),
    **{target: (target, []) for target in ("train", "summary", "evaluate", "predict")},
    "synthesize": ("data.synthesize", []),
    "prepare": ("data.prepare", []),
}
ENTRY_POINT = re.compile(r"-m deblur_diffusion\.([\w.]+)(.*)")
MAKE = re.compile(r"make (\w+)(?: ARGS=\"([^\"]*)\")?")


@dataclass
class Command:
    """A documented command line: where it is, the module it runs, its arguments, and the ranks its
    launcher starts (srun's tasks, torchrun's processes), when it says."""

    where: str
    module: str
    arguments: list[str]
    launcher_ranks: int | None = None


def _snippets(path: Path) -> list[str]:
    """Code a reader copies: fenced blocks and inline code of a page; a whole batch or shell file."""
    text = path.read_text()
    if path.suffix != ".md":
        return [text]
    blocks = re.findall(r"```[\w-]*\n(.*?)```", text, re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    # Inline code may wrap onto the next line of a paragraph (not across a blank line).
    inline = re.findall(r"`((?:[^`\n]|\n(?!\s*\n))+)`", prose)
    return blocks + [" ".join(code.split("\n")) for code in inline]


def _launcher_ranks(line: str, snippet: str) -> int | None:
    if "srun" in line:
        tasks = re.search(r"--ntasks-per-node[= ](\d+)", snippet)
        nodes = re.search(r"--nodes[= ](\d+)", snippet)
        return int(tasks.group(1) if tasks else 1) * int(nodes.group(1) if nodes else 1)
    if "torchrun" in line:
        per_node = re.search(r"--nproc[-_]per[-_]node[= ](\d+)", line)
        nodes = re.search(r"--nnodes[= ](\d+)", line)
        return int(per_node.group(1) if per_node else 1) * int(nodes.group(1) if nodes else 1)
    return None


def _arguments(text: str, snippet: str) -> list[str]:
    """Placeholders stand for a value (any value composes); SLURM's task variables for what the
    batch file asks; a sweep's comma list for its first value."""
    tasks = re.search(r"--ntasks-per-node[= ](\d+)", snippet)
    nodes = re.search(r"--nodes[= ](\d+)", snippet)
    text = text.replace("$SLURM_NTASKS_PER_NODE", tasks.group(1) if tasks else "1").replace(
        "$SLURM_NNODES", nodes.group(1) if nodes else "1"
    )
    # An argument whose whole value is a placeholder is left out (the config's default stands).
    text = re.sub(r"(^|\s)[\w.+/@~-]+=(?:<[^>]*>|\.\.\.|\$\w+|\$\{\w+\})(?=\s|$)", r"\1", text)
    text = re.sub(r"<[^>]*>|\$\w+|\$\{\w+\}", "x", text)
    # A word in capitals alone (ARGS, OVERRIDES) names the arguments in a description.
    # [key=...] marks an optional argument in a description.
    arguments = [a for a in shlex.split(text) if a not in ("...", "-m", "--multirun") and not re.fullmatch(r"#.*|[A-Z_]+|\[.*=.*\]", a)]
    swept = [re.sub(r"^([^=\[{]+=)([^,\[{]+),[^\[{]*$", r"\1\2", a) for a in arguments]
    return [a.replace("...", "x") for a in swept]


def documented_commands() -> list[Command]:
    commands = []
    for path in SOURCES:
        where = path.relative_to(ROOT).as_posix()
        for snippet in _snippets(path):
            joined = re.sub(r"\\\n\s*", " ", snippet)
            # Shell variables that hold a command (T="python -m ..."; $T experiment=...).
            aliases = dict(re.findall(r'^(\w+)="([^"]*)"$', joined, re.M))
            for line in joined.splitlines():
                line = line.split(" # ")[0].split("  #")[0].strip()
                if line.startswith("#") or re.match(r'^\w+="', line):
                    continue
                for name, value in aliases.items():
                    line = re.sub(rf"\${name}\b", value, line)
                found = ENTRY_POINT.search(line)
                if found and found.group(1) in HYDRA_APPS:
                    commands.append(Command(where, found.group(1), _arguments(found.group(2), snippet), _launcher_ranks(line, snippet)))
                made = MAKE.search(line)
                if made and made.group(1) in MAKE_TARGETS:
                    module, preset = MAKE_TARGETS[made.group(1)]
                    commands.append(Command(where, module, [*preset, *_arguments(made.group(2) or "", snippet)]))
    return commands


COMMANDS = documented_commands()


def test_every_place_a_user_reads_holds_commands_of_every_entry_point():
    assert {command.module for command in COMMANDS} == set(HYDRA_APPS)
    found_in = {command.where for command in COMMANDS}
    assert {"README.md", "experiments/slurm/train.sbatch", "docs/guides/scale-out.md", "docs/development.md"} <= found_in
    launched = [command for command in COMMANDS if command.launcher_ranks]
    assert {command.launcher_ranks for command in launched} >= {4, 8}  # the sbatch file's srun, torchrun on 2 x 4


def _devices_given(arguments: list[str]) -> bool:
    return any(re.match(r"trainer\.devices=\d+$", a) for a in arguments)


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where}:{c.module}:{i}" for i, c in enumerate(COMMANDS)])
def test_a_documented_command_composes_and_plans_at_the_world_size_it_states(tmp_path, command):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        paths = [f"paths.root_dir={tmp_path}"] if command.module not in ("data.synthesize", "data.prepare") else []
        cfg = compose(HYDRA_APPS[command.module], overrides=[*command.arguments, *paths])
    if command.module not in ("train", "summary"):
        return
    if command.launcher_ranks is not None or _devices_given(command.arguments) or cfg.trainer.devices not in (-1, "-1", "auto"):
        plan = training_plan(cfg)  # refuses a global batch the stated devices cannot split
        if command.launcher_ranks is not None:
            assert plan.world_size == command.launcher_ranks, (
                f"the launcher starts {command.launcher_ranks} ranks, the plan {plan.world_size}"
            )


def _composing_stand_in(launched: list[tuple[str, list[str]]], tmp_path: Path):
    """``subprocess.run`` for a launcher script: composes (and, for train, plans) the command it
    is given instead of running it, leaves the checkpoint a finished run would, and prints a
    validation table for the script to read."""

    def run(command, **kwargs):
        assert command[:2] == [sys.executable, "-m"] and command[2].startswith("deblur_diffusion."), command
        module, arguments = command[2].removeprefix("deblur_diffusion."), command[3:]
        paths = [f"paths.root_dir={tmp_path}"] if module not in ("data.synthesize", "data.prepare") else []
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(HYDRA_APPS[module], overrides=[*arguments, *paths])
        if module == "train":
            training_plan(cfg)
            run_dir = next(Path(a.split("=", 1)[1]) for a in arguments if a.startswith("hydra.run.dir="))
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "checkpoints" / "step0000001.ckpt").touch()
        launched.append((module, arguments))
        table = "│ PSNR │ 20.00 dB │ 21.00 dB │\n│ SSIM │ 0.5000 │ 0.6000 │\n"
        return subprocess.CompletedProcess(command, 0, table, "")

    return run


LAUNCHERS = sorted((ROOT / "experiments").rglob("*.py"))


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=[p.relative_to(ROOT).as_posix() for p in LAUNCHERS])
def test_every_command_a_launcher_script_starts_composes_and_plans(tmp_path, monkeypatch, launcher):
    import importlib.util

    spec = importlib.util.spec_from_file_location(launcher.stem, launcher)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    launched = []
    monkeypatch.setattr(script.subprocess, "run", _composing_stand_in(launched, tmp_path))
    monkeypatch.setattr(sys, "argv", [str(launcher), "--out", str(tmp_path / "out"), "--timesteps", "2"])
    script.main()
    assert "train" in {module for module, _ in launched} and (tmp_path / "out" / "results.md").is_file()


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
