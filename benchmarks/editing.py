"""Editing MNIST digits with a trained unconditional model: inpainting and SDEdit.

    .venv/bin/python benchmarks/editing.py --checkpoint RUN --data-root ../shared/data/mnist \\
        --picture docs/images/editing-mnist.png

* Inpainting: the lower half of ``--n`` MNIST test digits (a spread subset, fixed) is filled by
  RePaint (the ancestral sampler over 50 respaced steps, jump length 10, 10 resamplings: the
  defaults of ``ddpm inpaint``) and by plain replacement (the same sampler, 1 resampling). Each is
  classified by the project's MNIST LeNet (``ddpm.evaluation.classify``) against the true labels,
  beside the masked inputs (lower half black) and the originals.
* SDEdit (``ddpm edit``, default sampler) at strengths 0.3, 0.5, 0.7 on ``--sdedit-n`` test
  digits: the fast FID (LeNet features against the 10,000 test digits) and the share of results
  the classifier gives the input's label.

Prints one Markdown table per part and writes a labelled picture; results in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ddpm.data import load_dataset
from ddpm.pixels import to_tensor
from ddpm.editing import edit, inpaint, masked_preview, named_mask, result_grid
from ddpm.evaluation import classify, fast_metric, fast_reference
from ddpm.evaluation.reference import subset_indices
from ddpm.device import select_device
from ddpm.generate import load_diffusion
from ddpm.images import save_png, side_by_side
from ddpm.samplers import DEFAULT_SAMPLING


def accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    return float((classify(images).argmax(axis=1) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", required=True, help="MNIST IDX folder")
    parser.add_argument("--n", type=int, default=100, help="test digits to inpaint (default 100)")
    parser.add_argument("--sdedit-n", type=int, default=500, help="test digits to edit per strength (default 500)")
    parser.add_argument("--strengths", default="0.3,0.5,0.7")
    parser.add_argument("--picture", help="PNG: 10 digits, inpainted and edited")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()

    diffusion, meta = load_diffusion(args.checkpoint, device=select_device(args.device))
    test = load_dataset("mnist", data_root=args.data_root, split="test")
    keep = named_mask("lower-half", diffusion.image_size)
    pick = subset_indices(test.num_images, args.n, seed=0)
    originals, labels = test.images[pick], test.labels[pick]
    print(f"checkpoint {meta['path']} (step {meta['step']}); {args.n} test digits, lower half filled")
    rows = {"originals": originals, "masked (lower half black)": np.where(keep.numpy()[None, :, :, None], originals, 0)}
    methods = {"RePaint (jump 10, 10 resamplings)": {}, "replacement (1 resampling)": {"resample": 1}}
    seconds = {}
    for name, options in methods.items():
        start = time.perf_counter()
        rows[name] = inpaint(diffusion, to_tensor(originals), keep, sampling=DEFAULT_SAMPLING, seed=0,
                             batch_size=args.batch_size, **options)
        seconds[name] = time.perf_counter() - start
    print("| images | LeNet accuracy | seconds |\n|---|---|---|")
    for name, images in rows.items():
        print(f"| {name} | {accuracy(images, labels):.2f} | {seconds.get(name, 0):.0f} |", flush=True)

    reference = fast_reference("mnist", data_root=args.data_root)
    pick_edit = subset_indices(test.num_images, args.sdedit_n, seed=1)
    inputs, input_labels = test.images[pick_edit], test.labels[pick_edit]
    print(f"\nSDEdit, {args.sdedit_n} test digits, default sampler ({DEFAULT_SAMPLING.sampler}, at most "
          f"{DEFAULT_SAMPLING.steps} steps over [t0, 0])")
    print("| strength S | t0 | fast FID | keeps the label (LeNet) | seconds |\n|---|---|---|---|---|")
    print(f"| 0 (the inputs) | - | {fast_metric(inputs, reference)['fast_fid']:.1f} | "
          f"{accuracy(inputs, input_labels):.2f} | 0 |")
    edited = {}
    for strength in (float(s) for s in args.strengths.split(",")):
        start = time.perf_counter()
        edited[strength] = edit(diffusion, to_tensor(inputs), strength, seed=0, batch_size=args.batch_size,
                                sampling=DEFAULT_SAMPLING)
        t0 = round(strength * (diffusion.timesteps - 1))
        print(f"| {strength:g} | {t0} | {fast_metric(edited[strength], reference)['fast_fid']:.1f} | "
              f"{accuracy(edited[strength], input_labels):.2f} | {time.perf_counter() - start:.0f} |", flush=True)
    if args.picture:
        first = slice(0, 10)
        inpainting = result_grid([masked_preview(rows["originals"][first], keep),
                                  *[rows[name][first] for name in methods], rows["originals"][first]])
        sdedit = result_grid([inputs[first], *[edited[s][first] for s in edited]])
        save_png(args.picture, side_by_side(
            [inpainting, sdedit],
            ["inpainting, rows: masked input, RePaint, replacement, original",
             f"SDEdit, rows: input, S = {', '.join(f'{s:g}' for s in edited)}"]))
        print(f"\nwrote {args.picture}")


if __name__ == "__main__":
    main()
