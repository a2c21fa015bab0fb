"""Swintormer's diffusion-prior pipeline at toy scale, end to end on the CPU.

    python experiments/swintormer_dpdd_table7/chain_small.py [--out DIR] [--timesteps 5 50]

1. writes a fixed synthetic dataset (256 training pairs of 96 px, 8 test pairs) in the GoPro layout;
2. trains the tiny latent diffusion model: autoencoder, UNet, then the decoder (experiment=ldm_quick);
3. generates the priors of every split with each T (generate_prior);
4. trains a small Swintormer without prior and with the prior of each T (data.prior_dir).

Prints the validation PSNR / SSIM and the time of each step as a Markdown table (DIR/results.md).
Steps that finished (DIR/<step>.done) are not run again, so an interrupted chain goes on where it stopped.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROW = re.compile(r"│ (PSNR|SSIM)\s+│\s+([\d.]+)(?: dB)?\s+│\s+([\d.]+)")
SWINTORMER = [
    "model=swintormer",
    "model.net.dim=16",
    "model.net.num_blocks=[1,1,1,1]",
    "model.net.num_refinement_blocks=1",
    "model.net.heads=[1,1,2,2]",
    "model.net.window_size=4",
    "model.optimizer.lr=1e-3",
    "model.scheduler.periods=[600]",
    "model.scheduler.eta_mins=[1e-5]",
    "model.ema_decay=null",
    "data=gopro",
    "data/schedule=constant",
    "data.patch_schedule=[[0,48,8]]",
    "data.num_workers=1",
    "trainer=cpu",
    "trainer.max_steps=600",
    "trainer.val_check_interval=200",
    "trainer.log_every_n_steps=20",
    "test=false",
]


def run(out: Path, name: str, module: str, *overrides: str) -> tuple[str, float]:
    """Runs one step, or reads back the output and time of a step that finished in an earlier call."""
    log, done = out / f"{name}.log", out / f"{name}.done"
    if done.is_file():
        return log.read_text(), float(done.read_text())
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", f"deblur_diffusion.{module}", *overrides], capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"{name} failed, see {log}; run the script again with the same --out to go on from there")
    seconds = time.perf_counter() - start
    done.write_text(f"{seconds:.1f}\n")
    return result.stdout + result.stderr, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/swintormer_prior_small"))
    parser.add_argument("--timesteps", type=int, nargs="*", default=[5, 50])
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = [f"paths.data_dir={out}/data"]
    rows = []

    def record(label: str, stdout: str, seconds: float) -> None:
        metrics = {m[1]: (float(m[2]), float(m[3])) for m in ROW.finditer(stdout)}
        rows.append((label, metrics, seconds))
        print(f"{label}: {metrics or ''} ({seconds:.0f} s)", flush=True)

    _, seconds = run(out, "synthesize", "data.synthesize", f"out={out}/data/GoPro", "train_pairs=256", "test_pairs=8", "image_size=96")
    rows.append(("write the synthetic dataset", {}, seconds))
    previous = []
    for stage in ("autoencoder", "prior", "decoder_finetune"):
        steps = ["trainer.max_steps=100"] if stage == "decoder_finetune" else []
        stdout, seconds = run(
            out,
            stage,
            "train",
            "experiment=ldm_quick",
            f"model=ldm_{stage}",
            *data,
            *previous,
            *steps,
            f"hydra.run.dir={out}/{stage}",
            "test=false",
        )
        record(f"LDM stage: {stage} (validation: {'reconstruction' if stage == 'autoencoder' else 'sampled prior'})", stdout, seconds)
        previous = [f"model.init_ckpt={next((out / stage / 'checkpoints').glob('step*.ckpt'))}"]
    decoder = next((out / "decoder_finetune" / "checkpoints").glob("step*.ckpt"))

    stdout, seconds = run(out, "swintormer", "train", *SWINTORMER, *data, f"hydra.run.dir={out}/swintormer")
    record("Swintormer without prior", stdout, seconds)
    for steps in args.timesteps:
        seconds = sum(
            run(
                out,
                f"priors_T{steps}_{split}",
                "generate_prior",
                f"ckpt={decoder}",
                "data=gopro",
                *data,
                f"split={split}",
                f"steps={steps}",
                f"out={out}/priors/T{steps}",
            )[1]
            for split in ("train", "val")
        )
        rows.append((f"generate_prior, T = {steps} (train + val)", {}, seconds))
        stdout, seconds = run(
            out,
            f"swintormer_T{steps}",
            "train",
            *SWINTORMER,
            *data,
            f"data.prior_dir={out}/priors/T{steps}",
            f"hydra.run.dir={out}/swintormer_T{steps}",
        )
        record(f"Swintormer with the prior, T = {steps}", stdout, seconds)

    lines = ["| step | val PSNR (dB) | val SSIM | time (s) |", "|---|---|---|---|"]
    for label, metrics, seconds in rows:
        psnr = f"{metrics['PSNR'][1]:.2f} (blurry {metrics['PSNR'][0]:.2f})" if "PSNR" in metrics else "-"
        ssim = f"{metrics['SSIM'][1]:.4f}" if "SSIM" in metrics else "-"
        lines.append(f"| {label} | {psnr} | {ssim} | {seconds:.0f} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
