"""mkdocs hook: the presets page lists every experiment preset with the header of its config file."""

from __future__ import annotations

from pathlib import Path

EXPERIMENTS = Path(__file__).parents[1] / "src" / "deblur_diffusion" / "conf" / "experiment"


def preset_sections() -> str:
    sections = []
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            if line.strip() != "# @package _global_":
                header.append(line[1:].strip())
        text = "\n".join(header) or "(no description)"
        sections.append(f"## `experiment={path.stem}`\n\n```text\n{text}\n```\n")
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_path == "presets.md":
        return markdown.replace("<!-- presets -->", preset_sections())
    return markdown
