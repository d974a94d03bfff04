"""A trained checkpoint exported to diffusers samples the same images as `ddpm sample`.

Exports CHECKPOINT with `ddpm.interop.export_diffusers`, loads the folder with
`diffusers.DDPMPipeline.from_pretrained` (offline) and, for each step count, runs the pipeline with
one CPU generator per image seeded `derive_seed(seed, k)` -- the noise `ddpm sample` gives image k --
beside our sampler over the same steps (`ddpm sample --steps K`; all T with `--sampler ddpm`).
Prints the largest pixel difference in [0, 1], the share of identical uint8 pixels and both wall
times. Needs the diffusers extra.

    python benchmarks/diffusers_equivalence.py --checkpoint /tmp/mj/run --n 16 --steps 50 1000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from ddpm.generate import load_diffusion
from ddpm.interop import export_diffusers, require_diffusers
from ddpm.samplers import SamplingOptions
from ddpm.sampling import sample_images
from ddpm.seeding import derive_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 1000])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    diffusers = require_diffusers()
    diffusers.utils.logging.set_verbosity_error()

    diffusion, meta = load_diffusion(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = export_diffusers(args.checkpoint, os.path.join(tmp, "pipeline"))
        print(f"exported {meta['path']} in {time.perf_counter() - start:.2f} s "
              f"(T = {diffusion.timesteps}, variance {diffusion.variance}, objective {diffusion.objective})")
        pipe = diffusers.DDPMPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        spacing = pipe.scheduler.config.timestep_spacing
        print("| steps | max abs difference (images in [0, 1]) | identical uint8 pixels | diffusers s | ddpm s |")
        print("|---|---|---|---|---|")
        for steps in args.steps:
            generators = [torch.Generator().manual_seed(derive_seed(args.seed, k)) for k in range(args.n)]
            start = time.perf_counter()
            theirs = pipe(batch_size=args.n, generator=generators, num_inference_steps=steps,
                          output_type="pt").images
            mid = time.perf_counter()
            sampling = (SamplingOptions(sampler="ddpm") if steps == diffusion.timesteps else
                        SamplingOptions(sampler="ddpm", steps=steps, spacing=spacing))
            ours = sample_images(diffusion, list(range(args.n)), seed=args.seed, sampling=sampling)
            end = time.perf_counter()
            same = ((theirs * 255).round() == (ours * 255).round()).float().mean()
            print(f"| {steps} | {float((theirs - ours).abs().max()):.2e} | {float(same):.4f} | "
                  f"{mid - start:.1f} | {end - mid:.1f} |")


if __name__ == "__main__":
    main()
