"""Loading a CompVis latent-diffusion checkpoint *as released* (``model.ckpt`` + ``config.yaml``,
e.g. the LDM-BSR 4x super-resolution model that Swintormer uses as its prior) into a
:class:`LatentPriorModel` built on diffusers' ``VQModel`` and ``UNet2DModel``.

Written from the behaviour of ``ldm.modules.diffusionmodules.openaimodel.UNetModel`` and
``ldm.modules.diffusionmodules.model.Encoder/Decoder``; only what the LDM-SR family uses is
supported (concat conditioning, VQ first stage, no spatial transformer, no up/down res blocks).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import UNet2DModel, VQModel
from omegaconf import OmegaConf

from deblur_diffusion.checkpoints import CheckpointError, load_weights, unreadable
from deblur_diffusion.models.latent_prior import LatentPriorModel, sqrt_linear_alphas_cumprod

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
FIRST_STAGE_PREFIX = "first_stage_model."
# Lightning <= 1.4 keys the callbacks' state by the callback class itself, so the pickle names it.
LIGHTNING_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
    "pytorch_lightning.callbacks.progress.ProgressBar",
    "pytorch_lightning.callbacks.progress.tqdm_progress.TQDMProgressBar",
)


class _LightningPlaceholder:
    """Stands for a Lightning callback class named in a checkpoint (only used as a dict key)."""


def read_ldm_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a CompVis checkpoint, read with ``weights_only=True``; the Lightning
    callback classes such files name are allowed as inert placeholders, anything else refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # pre-1.6 (non-zip) files cannot be scanned: allow the Lightning names only
        needed = set(LIGHTNING_GLOBALS)
    foreign = sorted(needed - set(LIGHTNING_GLOBALS))
    if foreign:
        raise CheckpointError(f"{path} pickles objects other than tensors and Lightning callbacks: {foreign}")
    allowed = [(_LightningPlaceholder, name) for name in sorted(needed)]
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise unreadable(path, error) from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(key.startswith(UNET_PREFIX) for key in state):
        raise CheckpointError(f"{path} is not a CompVis LatentDiffusion checkpoint (no '{UNET_PREFIX}*' weights)")
    return state


def read_ldm_config(path: str | Path) -> dict:
    """``model.params`` of an LDM ``config.yaml`` as plain Python values."""
    config = OmegaConf.to_container(OmegaConf.load(Path(path)), resolve=True)
    model = config.get("model", config)
    if not str(model.get("target", "")).endswith("LatentDiffusion"):
        raise CheckpointError(f"{path} does not describe an ldm LatentDiffusion model")
    return model["params"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckpointError(f"unsupported LDM configuration: {message}")


def unet_from_ldm(params: dict) -> tuple[UNet2DModel, dict]:
    """An empty ``UNet2DModel`` with the architecture of ``unet_config.params`` and the layout
    facts the weight conversion needs."""
    p = params
    for key, default in (
        ("use_scale_shift_norm", False),
        ("resblock_updown", False),
        ("use_spatial_transformer", False),
        ("num_classes", None),
        ("dims", 2),
        ("conv_resample", True),
    ):
        _require(p.get(key, default) == default, f"{key}={p.get(key)}")
    levels = len(p["channel_mult"])
    channels = [p["model_channels"] * m for m in p["channel_mult"]]
    attention = [2**level in set(p["attention_resolutions"]) for level in range(levels)]
    head_channels = p.get("num_head_channels", -1)
    if head_channels == -1:
        widths = {c // p["num_heads"] for c, a in zip(channels, attention, strict=False) if a} | {channels[-1] // p["num_heads"]}
        _require(len(widths) == 1, "num_heads with different head widths per level")
        head_channels = widths.pop()
    heads_upsample = p.get("num_heads_upsample", -1)
    _require(heads_upsample in (-1, p.get("num_heads", -1)), "num_heads_upsample")
    unet = UNet2DModel(
        sample_size=p.get("image_size"),
        in_channels=p["in_channels"],
        out_channels=p["out_channels"],
        block_out_channels=channels,
        layers_per_block=p["num_res_blocks"],
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        attention_head_dim=head_channels,
        norm_num_groups=32,  # ldm normalization(): GroupNorm32(32, channels), eps 1e-5
        norm_eps=1e-5,
        flip_sin_to_cos=True,  # timestep_embedding: [cos, sin], freqs exp(-ln(1e4) i / half)
        freq_shift=0,
        downsample_padding=1,
        resnet_time_scale_shift="default",
        add_attention=True,
        act_fn="silu",
    )
    layout = dict(levels=levels, blocks=p["num_res_blocks"], attention=attention, new_order=p.get("use_new_attention_order", False))
    return unet, layout


def _attention(prefix: str, target: str, state: dict, heads: int, new_order: bool) -> dict:
    """LDM AttentionBlock (norm, qkv conv1d, proj_out conv1d) -> diffusers Attention."""
    qkv_w, qkv_b = state[f"{prefix}.qkv.weight"][..., 0], state[f"{prefix}.qkv.bias"]
    channels = qkv_w.shape[1]
    # legacy order: rows are [head][q|k|v][head_dim]; new order: [q|k|v][head][head_dim]
    shape = (heads, 3, channels // heads) if not new_order else (3, heads, channels // heads)
    w, b = qkv_w.reshape(*shape, channels), qkv_b.reshape(shape)
    pick = (lambda x, i: x[:, i]) if not new_order else (lambda x, i: x[i])
    out = {f"{target}.group_norm.weight": state[f"{prefix}.norm.weight"], f"{target}.group_norm.bias": state[f"{prefix}.norm.bias"]}
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        out[f"{target}.{name}.weight"] = pick(w, i).reshape(channels, channels)
        out[f"{target}.{name}.bias"] = pick(b, i).reshape(channels)
    out[f"{target}.to_out.0.weight"] = state[f"{prefix}.proj_out.weight"][..., 0]
    out[f"{target}.to_out.0.bias"] = state[f"{prefix}.proj_out.bias"]
    return out


RES_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _resblock(prefix: str, target: str, state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key.startswith(prefix + "."):
            layer, param = key[len(prefix) + 1 :].rsplit(".", 1)
            out[f"{target}.{RES_NAMES[layer]}.{param}"] = value
    return out


def convert_unet(state: dict[str, torch.Tensor], layout: dict, heads: dict[str, int]) -> dict[str, torch.Tensor]:
    """openaimodel ``UNetModel`` weights (keys without ``model.diffusion_model.``) -> ``UNet2DModel``.
    ``heads`` maps each diffusers attention module name to its number of heads."""
    levels, blocks, attention, new_order = layout["levels"], layout["blocks"], layout["attention"], layout["new_order"]
    out = {}
    plain = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    for source, target in plain.items():
        for param in ("weight", "bias"):
            out[f"{target}.{param}"] = state[f"{source}.{param}"]

    def attn(source: str, target: str) -> None:
        out.update(_attention(source, target, state, heads[target], new_order))

    index = 1
    for level in range(levels):
        for block in range(blocks):
            out.update(_resblock(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{block}", state))
            if attention[level]:
                attn(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{block}")
            index += 1
        if level != levels - 1:
            for param in ("weight", "bias"):
                out[f"down_blocks.{level}.downsamplers.0.conv.{param}"] = state[f"input_blocks.{index}.0.op.{param}"]
            index += 1
    out.update(_resblock("middle_block.0", "mid_block.resnets.0", state))
    attn("middle_block.1", "mid_block.attentions.0")
    out.update(_resblock("middle_block.2", "mid_block.resnets.1", state))
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        for block in range(blocks + 1):
            out.update(_resblock(f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{block}", state))
            if attention[level]:
                attn(f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{block}")
            if block == blocks and level != 0:
                position = 2 if attention[level] else 1
                for param in ("weight", "bias"):
                    out[f"up_blocks.{up}.upsamplers.0.conv.{param}"] = state[f"output_blocks.{index}.{position}.conv.{param}"]
            index += 1
    return out


def vq_from_ldm(params: dict) -> VQModel:
    """An empty ``VQModel`` with the architecture of ``first_stage_config.params`` (VQModelInterface)."""
    dd = params["ddconfig"]
    _require(not dd.get("double_z", False), "double_z (a KL first stage)")
    _require(not dd.get("attn_resolutions"), "attention inside the first stage's levels")
    _require(params.get("remap") is None, "a remapped codebook")
    levels = len(dd["ch_mult"])
    return VQModel(
        in_channels=dd["in_channels"],
        out_channels=dd["out_ch"],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]],
        layers_per_block=dd["num_res_blocks"],
        latent_channels=dd["z_channels"],
        num_vq_embeddings=params["n_embed"],
        vq_embed_dim=params["embed_dim"],
        norm_num_groups=32,
        scaling_factor=1.0,
    )


def convert_vq(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """taming/ldm ``VQModel`` weights (keys without ``first_stage_model.``) -> diffusers ``VQModel``."""
    rules = [
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
        (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
        (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
        (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
        (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}."),
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0."),
    ]
    out = {}
    for key, value in state.items():
        new = key
        for pattern, replacement in rules:
            new = re.sub(pattern, replacement, new)
        new = new.replace(".nin_shortcut.", ".conv_shortcut.")
        if ".attentions.0.to_" in new and value.dim() == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> Linear
        out[new] = value
    return out


def ema_name(name: str) -> str:
    """LitEma's buffer name of ``model.<name>``: the dots removed."""
    return EMA_PREFIX + name.replace(".", "")


def ldm_alphas_cumprod(params: dict) -> torch.Tensor:
    """``alphas_cumprod`` as LatentDiffusion registers it from its config's "linear" schedule."""
    _require(params.get("beta_schedule", "linear") == "linear", "a beta schedule other than linear")
    return sqrt_linear_alphas_cumprod(params.get("timesteps", 1000), params.get("linear_start", 1e-4), params.get("linear_end", 2e-2))


def load_compvis_ldm(checkpoint: str | Path, config: str | Path, use_ema: bool = True):
    """The :class:`LatentPriorModel` of a CompVis ``LatentDiffusion`` checkpoint and its config;
    the UNet takes the ``model_ema.*`` weights (what the official sampling runs with) unless
    ``use_ema=False`` or the checkpoint has none."""
    params = read_ldm_config(config)
    _require(
        params.get("conditioning_key", "concat" if params.get("concat_mode", True) else "crossattn") == "concat",
        "conditioning other than concat",
    )
    _require(params.get("parameterization", "eps") == "eps", "x0 parameterization")
    _require(str(params["first_stage_config"]["target"]).endswith("VQModelInterface"), "a first stage other than VQModelInterface")
    state = read_ldm_checkpoint(checkpoint)

    unet, layout = unet_from_ldm(params["unet_config"]["params"])
    raw = {key[len(UNET_PREFIX) :]: value for key, value in state.items() if key.startswith(UNET_PREFIX)}
    if use_ema:
        missing = [key for key in raw if ema_name("diffusion_model." + key) not in state]
        if len(missing) == len(raw):
            raise CheckpointError(f"{checkpoint} has no EMA weights ({EMA_PREFIX}*); pass use_ema=False")
        if missing:
            raise CheckpointError(f"{checkpoint}: EMA weights missing for {missing[:8]}")
        raw = {key: state[ema_name("diffusion_model." + key)] for key in raw}
    heads = {name: module.heads for name, module in unet.named_modules() if type(module).__name__ == "Attention"}
    load_weights(unet, convert_unet(raw, layout, heads), f"{checkpoint} (UNet)")

    first = params["first_stage_config"]["params"]
    autoencoder = vq_from_ldm(first)
    vq_state = {key[len(FIRST_STAGE_PREFIX) :]: value for key, value in state.items() if key.startswith(FIRST_STAGE_PREFIX)}
    load_weights(autoencoder, convert_vq(vq_state, len(first["ddconfig"]["ch_mult"])), f"{checkpoint} (first stage)")

    alphas_cumprod = ldm_alphas_cumprod(params)
    if "alphas_cumprod" in state and not torch.allclose(state["alphas_cumprod"], alphas_cumprod, rtol=0, atol=1e-6):
        raise CheckpointError(f"{checkpoint}: its alphas_cumprod buffer does not match the config's schedule")
    return LatentPriorModel(
        autoencoder,
        unet,
        num_train_timesteps=params.get("timesteps", 1000),
        beta_start=params.get("linear_start", 1e-4),
        beta_end=params.get("linear_end", 2e-2),
        beta_schedule="scaled_linear",
        alphas_cumprod=alphas_cumprod,
        scale_factor=float(params.get("scale_factor", 1.0)),
    ).eval()
