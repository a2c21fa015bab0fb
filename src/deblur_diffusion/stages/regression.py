"""The regression training stage: a network trained to map blurry inputs to sharp images.

Used as is by Restormer and Swintormer, and as the base of the HI-Diff and latent-diffusion stages,
which override what the network reads (``restore``), the loss terms (``training_losses``) and what
trains. It owns the loss, the optimiser and its schedule, gradient clipping, the EMA of the weights
(used for validation and saved in the checkpoint) and the validation metrics (PSNR and SSIM of the
restored output, and of the blurry input for reference).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from timm.utils import ModelEmaV3
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.optim import Optimizer
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio

from deblur_diffusion.channels import IMAGE_CHANNELS
from deblur_diffusion.checkpoints import EMA_PART_KEY
from deblur_diffusion.errors import ConfigError, DeblurError
from deblur_diffusion.inference import Inference
from deblur_diffusion.metrics import ssim
from deblur_diffusion.provenance import provenance
from deblur_diffusion.stages.warm_start import PartWeights, fine_tuning_weights, warm_start


class NonFiniteLossError(DeblurError):
    """The training loss became NaN or infinite."""


class MeanSSIM(MeanMetric):
    """The mean per-image SSIM of :func:`deblur_diffusion.metrics.ssim` (the definition ``evaluate``
    reports), accumulated across batches and devices."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(ssim(preds, target))


def image_metrics(prefix: str, postfix: str = "") -> MetricCollection:
    """Per-image PSNR and SSIM on [0, 1] images, averaged over images (the papers' protocol)."""
    return MetricCollection(
        {
            "psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)),
            "ssim": MeanSSIM(),
        },
        prefix=prefix,
        postfix=postfix,
    )


class RegressionStage(L.LightningModule):
    """Supervised restoration: ``loss(net(lq), gt)``.

    Args:
        net: the restoration network; takes (B, C_in, H, W), returns (B, 3, H, W).
        loss: a module ``loss(prediction, target) -> scalar``.
        optimizer: a factory ``optimizer(params) -> Optimizer`` (a Hydra partial).
        scheduler: a factory ``scheduler(optimizer) -> LRScheduler`` stepped every iteration, or None.
        grad_clip_norm: clip the global gradient norm to this value (None: no clipping).
        ema_decay: keep an exponential moving average of the weights with this decay, validate
            and test with it (None: no EMA). As BasicSR's ``model_ema``: it starts as a copy of the
            weights and is updated once per optimisation step, after it, with this decay (so
            accumulating micro-batches does not change it).
        inference: how validation, testing and ``forward`` run the network: on whole images
            (default) or on overlapping tiles.
        compile_network: compile with ``torch.compile`` the modules that the training step calls
            (:meth:`modules_to_compile`), in place, so checkpoints keep their parameter names.
        channels_last: keep the weights and the images of every batch in the channels-last memory
            layout, which the convolution kernels prefer (the same network: outputs move by float
            rounding only); measured 7-9 % faster training steps for the three networks on a CPU.
        init_ckpt: fine-tune from these weights: an official ``.pth`` (``params_ema`` when it has
            one, else ``params``), a checkpoint of this package (its EMA weights where it kept them),
            an export folder, or official files by part (``{transformer: net_g.pth, latent_encoder:
            net_le.pth}``). A new run: step 0, a fresh optimiser and schedule, the EMA starting from
            these weights; never applied on resume. See :func:`~deblur_diffusion.stages.warm_start.load_for_fine_tuning`
            for a first convolution that gains input channels.
        init_strict: fail when ``init_ckpt`` has missing, unexpected or mis-shaped keys (false:
            report them and keep those parameters as initialised).
    """

    # The part of ``net`` the EMA averages ("" = all of it); a stage with a frozen part sets its
    # trained part, so that the frozen weights are not copied into the EMA and every checkpoint.
    ema_part: str = ""
    # The part of the stage that ``init_ckpt`` starts.
    init_part: str = "net"

    @staticmethod
    def modules_to_compile(net: nn.Module) -> list[nn.Module]:
        """The modules whose calls the training step goes through (compiling a parent whose
        ``forward`` is never called would compile nothing that trains)."""
        return [net]

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[[Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
        grad_clip_norm: float | None = None,
        ema_decay: float | None = None,
        inference: Inference | None = None,
        compile_network: bool = False,
        channels_last: bool = False,
        init_ckpt: str | Mapping[str, str] | None = None,
        init_strict: bool = True,
    ):
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        net.to(memory_format=self.memory_format)
        if compile_network:
            for module in self.modules_to_compile(net):
                module.compile()
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.grad_clip_norm = grad_clip_norm
        self.inference = inference or Inference()
        self.ema = ModelEmaV3(self.averaged_network(), decay=ema_decay) if ema_decay else None
        if self.ema is not None:
            # The average only runs under validation, which sets eval mode itself; keeping it in
            # train mode like the rest avoids Lightning's "modules in eval mode" warning at fit start.
            self.ema.requires_grad_(False).train()
        self.val_metrics = image_metrics("val/")
        self.val_input_metrics = image_metrics("val/", "_input")
        self.test_metrics = image_metrics("test/")
        self.test_input_metrics = image_metrics("test/", "_input")
        self.run_config: dict | None = None
        # The weights parts of the stage start from (stage1_ckpt, init_ckpt, pretrained_dir, prior_ckpt).
        self.warm_start_sources: list[PartWeights] = []
        if init_ckpt is not None:
            self.warm_start_sources = fine_tuning_weights(init_ckpt, self.init_part, init_strict)

    @property
    def evaluation_metrics(self) -> list[str]:
        """The names validation and testing log (what ``optimized_metric`` may name)."""
        collections = (self.val_metrics, self.val_input_metrics, self.test_metrics, self.test_input_metrics)
        return [name for collection in collections for name in collection.keys(keep_base=False)]

    def warm_start(self) -> list[str]:
        """Loads ``warm_start_sources`` into their parts (and the EMA copy). ``train`` calls it before
        a run from scratch and never on resume, whose checkpoint holds every weight. Returns, for the
        user, what was loaded where and what fine-tuning sources widened or left out."""
        notes = warm_start(self, self.warm_start_sources)
        if self.ema is not None:
            self.ema.module.load_state_dict(self.averaged_network().state_dict())
        return notes

    def averaged_network(self) -> nn.Module:
        """The part of the network that the EMA averages (``ema_part``)."""
        return self.net.get_submodule(self.ema_part)

    @property
    def inference_net(self) -> nn.Module:
        """The weights used for validation, testing and export: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.net

    def inference_networks(self) -> dict[str, nn.Module]:
        """The networks that run at inference, by name (for ``summary``)."""
        return {"net": self.inference_net}

    def input_channels(self, image_channels: int) -> int:
        """Channels of the network's input for data with ``image_channels`` (for ``summary``)."""
        return image_channels

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        """Restores a batch with the inference weights, whole or tiled as configured."""
        return self.inference(self.inference_net, lq)

    def restore(self, batch: dict) -> torch.Tensor:
        """The restored images of a validation or test batch."""
        return self(batch["lq"])

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The named terms of the training loss (summed for the backward pass, logged each)."""
        return {"loss": self.loss(self.net(batch["lq"]), batch["gt"])}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: the network's parameters that are not frozen."""
        return [parameter for parameter in self.net.parameters() if parameter.requires_grad]

    def _in_memory_format(self, batch: dict) -> dict:
        return {
            key: value.contiguous(memory_format=self.memory_format) if torch.is_tensor(value) and value.ndim == 4 else value
            for key, value in batch.items()
        }

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch = self._in_memory_format(batch)
        terms = self.training_losses(batch)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at step {self.global_step} on rank {self.global_rank}, images {list(batch['name'])}; "
                "the checkpoints saved so far are intact. Lower the learning rate, enable gradient clipping "
                "or check these images."
            )
        batch_size = batch["lq"].shape[0]
        if len(terms) > 1:
            self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()}, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: Lightning calls that for every micro-batch, which with
        # accumulate_grad_batches=k would average with decay**k. No step argument: timm's ModelEmaV3
        # then uses the decay from the first update on, as BasicSR does (with a step it copies the
        # weights at step 1).
        if self.ema is not None:
            self.ema.update(self.averaged_network())

    def _evaluate(self, batch: dict, metrics: MetricCollection, input_metrics: MetricCollection) -> dict:
        batch = self._in_memory_format(batch)
        restored = self.restore(batch).clamp(0.0, 1.0)
        metrics.update(restored, batch["gt"])
        input_metrics.update(batch["lq"][:, :IMAGE_CHANNELS], batch["gt"])
        batch_size = batch["lq"].shape[0]
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log_dict(input_metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        return {"restored": restored}

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch, self.val_metrics, self.val_input_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch, self.test_metrics, self.test_input_metrics)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.grad_clip_norm
        if not clip:
            return
        if isinstance(self.trainer.model, FullyShardedDataParallel) and (gradient_clip_algorithm or "norm") == "norm":
            # Lightning's FSDP precision plugin refuses norm clipping; FSDP computes the global
            # norm over the shards itself.
            self.trainer.model.clip_grad_norm_(clip)
            return
        self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    def setup(self, stage: str) -> None:
        if self.ema is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ConfigError(
                "model.ema_decay is set but trainer=fsdp shards the weights the EMA copy averages; "
                "set model.ema_decay=null or use trainer=ddp"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[EMA_PART_KEY] = self.ema_part
        checkpoint["deblur_diffusion_provenance"] = provenance()
        if self.run_config is not None:
            checkpoint["deblur_diffusion_config"] = self.run_config
