"""Files a user downloads choose no code: a network config stored in a checkpoint or an export
folder may only name this package's networks, at any depth, and anything else is refused before
Hydra imports or calls it."""

from __future__ import annotations

import pytest
import torch
from networks import TINY_CONFIGS, tiny_network
from omegaconf import OmegaConf
from safetensors.torch import save_model

from deblur_diffusion import load_pretrained
from deblur_diffusion.checkpoints import CheckpointError


def _checkpoint(path, net_config):
    net = tiny_network("restormer")
    state = {f"net.{key}": value for key, value in net.state_dict().items()}
    torch.save({"state_dict": state, "deblur_diffusion_config": {"model": {"net": net_config}}}, path)
    return path


def _opening(victim):
    """A config that, built by Hydra, calls ``open(victim, 'w')``: creates or truncates the file."""
    return {"_target_": "builtins.open", "_args_": [str(victim), "w"]}


def test_a_checkpoint_naming_a_foreign_function_is_refused_and_runs_nothing(tmp_path):
    victim = tmp_path / "created_by_the_file"
    ckpt = _checkpoint(tmp_path / "evil.ckpt", _opening(victim))
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refusing to build 'builtins\.open' \(_target_\)"):
        load_pretrained(ckpt)
    assert not victim.exists()


def test_a_foreign_target_nested_inside_a_real_network_is_refused(tmp_path):
    victim = tmp_path / "created_by_the_file"
    nested = {**TINY_CONFIGS["restormer"], "bias": _opening(victim)}
    ckpt = _checkpoint(tmp_path / "nested.ckpt", nested)
    with pytest.raises(CheckpointError, match=r"refusing to build 'builtins\.open' \(bias\._target_\)"):
        load_pretrained(ckpt)
    assert not victim.exists()
    in_a_list = {**TINY_CONFIGS["restormer"], "heads": [1, _opening(victim), 1, 1]}
    with pytest.raises(CheckpointError, match=r"heads\[1\]\._target_"):
        load_pretrained(_checkpoint(tmp_path / "listed.ckpt", in_a_list))
    assert not victim.exists()


def test_an_interpolation_in_a_stored_config_is_refused_not_resolved(tmp_path):
    sneaky = {**TINY_CONFIGS["restormer"], "dim": "${oc.env:HOME}"}
    with pytest.raises(CheckpointError, match=r"dim holds an interpolation"):
        load_pretrained(_checkpoint(tmp_path / "interpolated.ckpt", sneaky))


def test_an_export_folder_naming_a_foreign_function_is_refused(tmp_path):
    victim = tmp_path / "created_by_the_file"
    folder = tmp_path / "export"
    folder.mkdir()
    save_model(tiny_network("restormer"), str(folder / "model.safetensors"))
    OmegaConf.save(OmegaConf.create({"net": {**TINY_CONFIGS["restormer"], "bias": _opening(victim)}}), folder / "config.yaml")
    with pytest.raises(CheckpointError, match=r"config\.yaml: refusing to build 'builtins\.open'"):
        load_pretrained(folder)
    assert not victim.exists()
    OmegaConf.save(OmegaConf.create({"net": {"_target_": "builtins.print", "_args_": ["hello"]}}), folder / "config.yaml")
    with pytest.raises(CheckpointError, match=r"'builtins\.print'"):
        load_pretrained(folder)


def test_the_package_networks_still_load_from_a_checkpoint(tmp_path):
    restorer = load_pretrained(_checkpoint(tmp_path / "fine.ckpt", TINY_CONFIGS["restormer"]), device="cpu")
    assert type(restorer.net).__name__ == "Restormer"
