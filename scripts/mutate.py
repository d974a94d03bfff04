"""Mutation testing: plant one realistic bug at a time and check that the tests that should catch it do.

Each mutant replaces one exact snippet of a source file. It is applied to a temporary COPY of src/
and tests/ (the working tree is never touched), and only the mutant's own test selection runs there
(``pytest -x -n 0``, in one process so that a failure exits 1, with a timeout, PYTHONPATH pointing at
the copy). A mutant is

* caught    -- the tests failed (or timed out),
* survived  -- the tests passed: a bug the suite is blind to,
* stale     -- its original snippet is no longer in the file (update the list after a refactor),
* equivalent -- marked so, with the reason; it is not run and not counted.

Usage::

    python scripts/mutate.py                    # every mutant
    python scripts/mutate.py --list             # the mutants, without running them
    python scripts/mutate.py --only train dpm   # mutants whose name contains one of these words
    python scripts/mutate.py --timeout 300 --log mutants.log

Prints one line per mutant and the score (caught / counted). See docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str                   # area.what, e.g. "train.no-grad-clip"
    file: str                   # relative to the repository root
    original: str               # an exact snippet of that file (must occur once)
    replacement: str
    tests: tuple[str, ...]      # pytest node ids or files, relative to the repository root
    description: str
    equivalent: str = ""        # why the mutant cannot change behaviour (then it is not run)


TRAIN, DIFF, SAMP, GEN = "src/ddpm/train.py", "src/ddpm/diffusion.py", "src/ddpm/samplers.py", "src/ddpm/generate.py"
STATE = "src/ddpm/training_state.py"
CKPT, METRICS, LIK = "src/ddpm/checkpoint.py", "src/ddpm/evaluation/metrics.py", "src/ddpm/evaluation/likelihood.py"
LOSSES, DENOISER = "src/ddpm/losses.py", "src/ddpm/denoiser.py"
EFFECTS = "tests/test_training_effects.py"
FRONT = "tests/test_sampling_frontend.py"
SAMPLING, VIZ = "src/ddpm/sampling.py", "src/ddpm/viz.py"
ORDER = "tests/test_sampler_order.py"
RESUME = "tests/test_resume.py::test_resumed_run_is_bit_identical_to_uninterrupted_run"
SCHEMA, BOUNDS = "src/ddpm/checkpoint_schema.py", "src/ddpm/interop/diffusers_bounds.py"
PREPARE, HUB, IMAGE_FILES = "src/ddpm/data/prepare.py", "src/ddpm/data/hub.py", "src/ddpm/data/image_files.py"
SIGMAS, EDM, EMA, POSTHOC = "src/ddpm/sigmas.py", "src/ddpm/edm.py", "src/ddpm/ema.py", "src/ddpm/posthoc_ema.py"
LR, COND, RESOLVE, PARSER = "src/ddpm/lr_schedules.py", "src/ddpm/conditions.py", "src/ddpm/resolve.py", "src/ddpm/cli/parser.py"
UNTRUSTED, CORPUS = "tests/test_untrusted_files.py", "tests/test_bad_inputs.py"
REFUSALS = "tests/test_input_refusals.py"

MUTANTS = [
    # --- the training loop -------------------------------------------------------------------------------
    Mutant("train.no-grad-clip", TRAIN, "tc.grad_clip if tc.grad_clip > 0 else math.inf", "math.inf",
           (f"{EFFECTS}::test_gradient_clipping_hands_the_optimizer_the_hand_clipped_gradient",),
           "gradient clipping disabled"),
    Mutant("train.importance-weights-unused", TRAIN,
           "weighted = per_sample if batch.t_weights is None else per_sample * batch.t_weights[rows]",
           "weighted = per_sample",
           (f"{EFFECTS}::test_importance_sampling_weights_each_loss_by_one_over_T_p_t",),
           "importance-sampling weights 1 / (T p_t) computed but not applied to the loss"),
    Mutant("train.offset-noise-unused", LOSSES,
           "noise = noise + offset_noise(noise.shape, self.offset_noise, generator=generator, device=noise.device)",
           "_ = offset_noise(noise.shape, self.offset_noise, generator=generator, device=noise.device)",
           (f"{EFFECTS}::test_offset_noise_shifts_eps_by_a_constant_per_sample_and_channel_in_input_and_target",),
           "offset noise drawn but never added to eps"),
    Mutant("train.self-condition-coin-unused", LOSSES, 'return noise, {"self_cond_mask": mask.to(noise.device)}',
           'return noise, {"self_cond_mask": torch.zeros_like(mask).to(noise.device)}',
           (f"{EFFECTS}::test_self_conditioning_feeds_the_first_passs_clamped_x0_to_the_samples_whose_coin_is_set",),
           "self-conditioning coin drawn but never applied (no sample gets the first pass)"),
    Mutant("train.lr-not-warmed-up", TRAIN, 'group["lr"] = setup.lr_schedule(step)', 'group["lr"] = tc.lr',
           (f"{EFFECTS}::test_the_optimizer_steps_with_the_warmed_up_learning_rate",),
           "the warm-up is logged but the optimizer keeps the peak learning rate"),
    Mutant("train.grad-accum-unscaled", TRAIN, "loss = weighted.mean() * (1 / tc.grad_accum)", "loss = weighted.mean()",
           (f"{EFFECTS}::test_gradient_accumulation_scales_each_micro_batch_and_sums_to_the_full_batch_gradient",),
           "micro-batch losses summed instead of averaged over grad_accum"),
    Mutant("train.hflip-height", TRAIN, "x = torch.where(flip[:, None, None, None], x.flip(3), x)",
           "x = torch.where(flip[:, None, None, None], x.flip(2), x)",
           (f"{EFFECTS}::test_hflip_trains_on_both_orientations_and_only_when_asked",),
           "flips along the height (a vertical flip) instead of the width"),
    Mutant("train.hflip-unused", TRAIN, "x = torch.where(flip[:, None, None, None], x.flip(3), x)",
           "x = torch.where(flip[:, None, None, None], x, x)",
           (f"{EFFECTS}::test_hflip_trains_on_both_orientations_and_only_when_asked",),
           "flip coins drawn, images never flipped"),
    Mutant("train.ema-no-warmup", STATE, "return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))",
           "return self.decay",
           (f"{EFFECTS}::test_ema_is_the_moving_average_of_the_weights_after_each_step",),
           "EMA warm-up ignored"),
    Mutant("train.ema-lerp-inverted", STATE, "[params[n].detach() for n in names], 1.0 - decay)",
           "[params[n].detach() for n in names], decay)", (f"{EFFECTS}::test_ema_is_the_moving_average_of_the_weights_after_each_step",),
           "EMA moves by decay instead of 1 - decay"),
    Mutant("train.label-dropout-unused", TRAIN,
           "y = label_dropout(setup.labels[index], config.model.num_classes, tc.label_dropout, g)[mine]",
           "y = setup.labels[index][mine]",
           ("tests/test_conditional.py::test_training_feeds_the_batch_labels_with_label_dropout",),
           "class labels never replaced by the null label"),
    Mutant("diffusion.loss-weighting-unused", LOSSES,
           "return mse * loss_weight(self.schedule, t, self.objective, self.weighting, self.min_snr_gamma)",
           "return mse",
           (f"{EFFECTS}::test_min_snr_weighting_reaches_the_loss",), "Min-SNR weighting never applied"),
    Mutant("diffusion.self-condition-unclamped", LOSSES,
           "denoiser.predict(x_t[idx], t[idx], model_kwargs=kwargs, clip=True)",
           "denoiser.predict(x_t[idx], t[idx], model_kwargs=kwargs, clip=False)",
           (f"{EFFECTS}::test_self_conditioning_feeds_the_first_passs_clamped_x0_to_the_samples_whose_coin_is_set",),
           "self-conditioning's x0 estimate not clamped to the data range"),

    # --- samplers ----------------------------------------------------------------------------------------
    Mutant("samplers.dpm-ratio-inverted", SAMP, "r = h_before / h    ", "r = h / h_before    ",
           (f"{ORDER}::test_dpm_solver_pp_2m_is_second_order_on_the_probability_flow_ode",),
           "DPM-Solver++(2M) step ratio r inverted: loses its second order"),
    Mutant("samplers.dpm-first-order", SAMP,
           "d = (1.0 + 1.0 / (2.0 * r)) * x0_pred - (1.0 / (2.0 * r)) * x0_before   # D_i",
           "d = x0_pred", (f"{ORDER}::test_dpm_solver_pp_2m_is_second_order_on_the_probability_flow_ode",),
           "DPM-Solver++ never uses its previous estimate (first order, i.e. DDIM)"),
    Mutant("samplers.ddim-direction-sigma", SAMP, "direction = _sqrt(1.0 - alpha_bar_prev - sigma ** 2) * eps_pred",
           "direction = _sqrt(1.0 - alpha_bar_prev) * eps_pred", ("tests/test_samplers.py",),
           "DDIM direction term ignores sigma^2 (eta > 0 over-disperses)"),
    Mutant("samplers.ancestral-coef2", SAMP,
           "coef2 = math.sqrt(1.0 - beta) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)",
           "coef2 = math.sqrt(1.0 - beta) * (1.0 - alpha_bar_t) / (1.0 - alpha_bar_t)", ("tests/test_samplers.py",),
           "posterior mean coefficient of x_t wrong in the respaced ancestral step"),
    Mutant("samplers.trailing-off-by-one", SAMP, "return [int(np.round(timesteps - k * timesteps / steps)) - 1 for k in range(steps)]",
           "return [int(np.round(timesteps - (k + 1) * timesteps / steps)) for k in range(steps)]",
           ("tests/test_samplers.py", ORDER), "trailing spacing shifted to the leading step set"),
    Mutant("samplers.guidance-inverted", DENOISER, "eps_pred = eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)",
           "eps_pred = eps_cond + self.guidance_scale * (eps_uncond - eps_cond)",
           (f"{FRONT}::test_guidance_scale_zero_is_the_unconditional_model",),
           "classifier-free guidance mixes from the conditional side"),
    Mutant("samplers.clip-eps-not-rederived", DENOISER,
           "return Prediction(predict_eps_from_x0(self.schedule, x_t, t, x0_pred), x0_pred, pred.var_values, pred.output)",
           "return Prediction(pred[0], x0_pred, pred.var_values, pred.output)", ("tests/test_samplers.py",), "clipping x0 without re-deriving eps (an inconsistent pair)"),

    # --- diffusion maths ---------------------------------------------------------------------------------
    Mutant("diffusion.q-sample-variance", DIFF, "+ extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)",
           "+ extract(1.0 - schedule.alphas_cumprod, t, x0) * noise)", ("tests/test_diffusion.py",),
           "q_sample scales the noise by 1 - alpha_bar instead of its square root"),
    Mutant("diffusion.posterior-mean-swapped", DIFF,
           "mean = extract(schedule.posterior_mean_coef1, t, x_t) * x0 + extract(schedule.posterior_mean_coef2, t, x_t) * x_t",
           "mean = extract(schedule.posterior_mean_coef2, t, x_t) * x0 + extract(schedule.posterior_mean_coef1, t, x_t) * x_t",
           ("tests/test_diffusion.py",), "posterior mean coefficients swapped"),
    Mutant("diffusion.v-target-sign", DIFF,
           "return extract(schedule.sqrt_alphas_cumprod, t, x0) * eps - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0",
           "return extract(schedule.sqrt_alphas_cumprod, t, x0) * eps + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0",
           ("tests/test_diffusion.py",), "v target with the wrong sign on x0"),
    Mutant("diffusion.kl-missing-half", DIFF, "return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)",
           "return (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)",
           ("tests/test_evaluation_likelihood.py", "tests/test_improved.py"), "Gaussian KL without its factor 1/2"),
    Mutant("diffusion.vlb-nats-not-bits", DIFF,
           "kl = mean_over_dims(normal_kl(true_mean.to(mean.dtype), true_log_var.to(mean.dtype), mean, log_var)) / LOG2",
           "kl = mean_over_dims(normal_kl(true_mean.to(mean.dtype), true_log_var.to(mean.dtype), mean, log_var))",
           ("tests/test_improved.py",), "L_vlb's KL terms in nats instead of bits (a missing log 2)"),
    Mutant("diffusion.decoder-bin-width", DIFF, "BIN_HALF_WIDTH = 1.0 / 255.0", "BIN_HALF_WIDTH = 2.0 / 255.0",
           ("tests/test_evaluation_likelihood.py",), "decoder bins twice as wide as the 8-bit grid"),
    Mutant("diffusion.far-tail-density", DIFF,
           "log_mid = torch.where(tail, log_hi + torch.log1p(-torch.exp(log_lo - log_hi)), log_mid)",
           "log_mid = torch.where(tail, log_hi, log_mid)", ("tests/test_evaluation_likelihood.py",),
           "far-tail bin mass taken as the whole tail beyond the bin"),
    Mutant("diffusion.min-snr-eps-weight", DIFF, '{"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0)}',
           '{"eps": clipped, "x0": clipped, "v": clipped / (snr + 1.0)}', ("tests/test_diffusion.py", EFFECTS),
           "Min-SNR weight for eps written as the x0-space weight"),

    # --- the sampling front-end (generate) ---------------------------------------------------------------
    Mutant("generate.interpolate-b-to-a", GEN, "latents = torch.cat([mix(x_t[:1], x_t[1:], lam) for lam in lams])",
           "latents = torch.cat([mix(x_t[1:], x_t[:1], lam) for lam in lams])",
           (f"{FRONT}::test_interpolation_starts_at_a_and_ends_at_b",), "interpolation runs from b to a"),
    Mutant("generate.ema-is-raw", GEN, 'load_weights(diffusion.model, tensors, select_weights(tensors, meta, weights), meta["path"])',
           'load_weights(diffusion.model, tensors, "model", meta["path"])',
           (f"{FRONT}::test_load_diffusion_loads_the_weights_asked_for",), "load_diffusion returns the raw weights as EMA"),
    Mutant("viz.progressive-rows-swapped", VIZ,
           "rows = np.stack([x_t.transpose(1, 0, 2, 3, 4), x0_pred.transpose(1, 0, 2, 3, 4)], axis=1)",
           "rows = np.stack([x0_pred.transpose(1, 0, 2, 3, 4), x_t.transpose(1, 0, 2, 3, 4)], axis=1)",
           (f"{FRONT}::test_progressive_grid_puts_each_images_x_t_row_above_its_x0_row",),
           "progressive grid shows the x0 row above the x_t row"),
    Mutant("generate.progressive-records-x", GEN,
           'x_t[info["i"]].append(to_uint8(from_model_range(info["x_t"]).cpu()))',
           'x_t[info["i"]].append(to_uint8(from_model_range(info["x"]).cpu()))',
           (f"{FRONT}::test_progressive_frames_are_the_samplers_own_x_t_and_x0_estimates",),
           "progressive frames record the step's output instead of its input x_t"),
    Mutant("generate.interpolation-noise-per-image", GEN, "eps = noise()[:1].expand_as(x0)", "eps = noise()[:2]",
           (f"{FRONT}::test_interpolation_starts_at_a_and_ends_at_b",),
           "a and b diffused with the rows of one noise draw",
           equivalent="every interpolant's generator has the same seed, so all rows of one draw are equal"),
    Mutant("sampling.guidance-ignored", SAMPLING, "if guidance_scale is not None and guidance_scale != 1:",
           "if False:", (f"{FRONT}::test_guidance_scale_zero_is_the_unconditional_model",),
           "the guidance scale is never passed to the sampler"),
    Mutant("sampling.image-seed-shifted", SAMPLING,
           "generators = [torch.Generator().manual_seed(derive_seed(seed, k)) for k in indices]",
           "generators = [torch.Generator().manual_seed(derive_seed(seed, k - indices[0])) for k in indices]",
           ("tests/test_samplers.py::test_image_k_depends_on_seed_and_k_only",),
           "image noise seeded by the position in the batch instead of the run index"),

    # --- checkpointing -----------------------------------------------------------------------------------
    Mutant("checkpoint.checksum-ignores-names", CKPT, 'h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())',
           'h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())', ("tests/test_checkpoint.py",),
           "checksum blind to renamed tensors"),
    Mutant("checkpoint.weights-not-strict", CKPT, "model.load_state_dict(split_prefix(tensors, prefix), strict=True)",
           "model.load_state_dict(split_prefix(tensors, prefix), strict=False)",
           ("tests/test_checkpoint.py", "tests/test_training_options.py::test_init_from_another_architecture_is_a_checkpoint_error"),
           "missing or unexpected weights silently ignored"),
    Mutant("checkpoint.newest-first", CKPT, "    return sorted(found)\n", "    return sorted(found, reverse=True)\n",
           ("tests/test_checkpoint.py", "tests/test_training_options.py::test_keep_last_spares_milestones"),
           "checkpoints listed newest first (resume and pruning take the wrong one)"),
    Mutant("checkpoint.optimizer-scalars-dropped", CKPT, "                scalars[f\"{idx}.{key}\"] = value\n",
           "                pass\n",
           ("tests/test_checkpoint.py::test_optimizer_state_keeps_number_valued_entries", RESUME),
           "non-tensor optimizer state (e.g. Adam's step when it is a number) not saved"),
    Mutant("checkpoint.ema-updates-not-restored", STATE, 'bank.num_updates = int(meta.get("ema_updates", 0))',
           "bank.num_updates = 0",
           (RESUME, "tests/test_resume.py::test_resume_from_an_older_checkpoint_repeats_lost_steps_exactly"),
           "a resumed run restarts the EMA warm-up"),

    # --- evaluation metrics ------------------------------------------------------------------------------
    Mutant("metrics.fid-trace-term", METRICS, "np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt",
           "np.trace(sigma1) + np.trace(sigma2) - trace_sqrt", ("tests/test_evaluation_metrics.py",),
           "FID's cross term without its factor 2"),
    Mutant("metrics.recall-uses-real-radii", METRICS, "recall = _coverage(real, fake, _knn_radii(fake, k))",
           "recall = _coverage(real, fake, _knn_radii(real, k))", ("tests/test_evaluation_metrics.py",),
           "recall measured with the real set's radii"),
    Mutant("metrics.recall-is-precision", METRICS, "return precision, recall", "return precision, precision",
           ("tests/test_evaluation_metrics.py",), "recall never computed (precision returned twice)"),
    Mutant("metrics.kid-biased", METRICS, "term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))",
           "term_xx = k_xx.sum() / (m * m)", ("tests/test_evaluation_metrics.py",), "KID's MMD^2 estimate biased"),
    Mutant("metrics.covariance-biased", METRICS, "return x.mean(axis=0), np.cov(x, rowvar=False)",
           "return x.mean(axis=0), np.cov(x, rowvar=False, bias=True)", ("tests/test_evaluation_metrics.py",),
           "feature covariance with 1/N instead of 1/(N - 1)"),
    Mutant("metrics.prior-bits", LIK,
           "return mean_over_dims(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))) / LOG2",
           "return mean_over_dims(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean)))",
           ("tests/test_evaluation_likelihood.py",), "the prior term L_T in nats instead of bits"),
    # --- code added with the later modules: schema, data, interop bounds, sigmas, EDM, EMA, schedules ----
    Mutant("schema.half-precision-ema-accepted", SCHEMA, "            if dtype != WEIGHT_DTYPE:",
           "            if dtype not in (WEIGHT_DTYPE, \"F16\"):", (UNTRUSTED,),
           "an EMA tensor in float16 passes the checkpoint checks"),
    Mutant("schema.data-position-unchecked", SCHEMA, "if global_batch is not None and position != step * global_batch:",
           "if global_batch is not None and position < 0:", (UNTRUSTED,),
           "data_position no longer has to be step x global_batch (a resume would read other images)"),
    Mutant("schema.torch-rng-size", SCHEMA, '_int_list(refuse, "rng.torch", rng["torch"], _TORCH_RNG_BYTES, 255)',
           '_int_list(refuse, "rng.torch", rng["torch"], len(rng["torch"]), 255)', (UNTRUSTED,),
           "a torch RNG state of any length passes"),
    Mutant("bounds.timesteps-unbounded", BOUNDS, "need(_is_int(T) and 2 <= T <= MAX_TIMESTEPS,",
           "need(_is_int(T) and 2 <= T,", (UNTRUSTED,),
           "diffusers' num_train_timesteps is not bounded: a table of 10^12 betas is allocated"),
    Mutant("prepare.no-fallocate", PREPARE, "            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)",
           "            pass", ("tests/test_prepared.py",),
           "the prepared array's blocks are not allocated first: a full disk is a SIGBUS mid-write, not a line"),
    Mutant("prepare.partial-kept-on-full-disk", PREPARE, "    if not resumable:\n        shutil.rmtree(partial, ignore_errors=True)",
           "    if False:\n        shutil.rmtree(partial, ignore_errors=True)", ("tests/test_prepared.py",),
           "a full disk before any row is written leaves its temporary folder behind"),
    Mutant("hub.labels-not-sorted", HUB, "        names = sorted(set(values))", "        names = list(dict.fromkeys(values))",
           ("tests/test_hub_datasets.py",),
           "string labels are numbered in order of appearance, not sorted: class indices depend on the row order"),
    Mutant("sigmas.karras-last-not-sigma-min", SIGMAS, "(a + i / (steps - 1) * (b - a)) ** rho", "(a + i / steps * (b - a)) ** rho",
           ("tests/test_continuous_samplers.py",), "the Karras levels stop short of sigma_min (EDM Eq. 5)"),
    Mutant("sigmas.sigma-is-variance", SIGMAS, ".pow(-1).sub(1.0).sqrt()", ".pow(-1).sub(1.0)",
           ("tests/test_continuous_samplers.py",), "the schedule's sigma is sigma^2 (1/alpha_bar - 1 without the root)"),
    Mutant("sigmas.denoiser-sign", SIGMAS, "return x - s * eps_pred.to(x.dtype)", "return x + s * eps_pred.to(x.dtype)",
           ("tests/test_continuous_samplers.py",), "D = x + sigma eps: the discrete model's denoiser adds its noise back"),
    Mutant("edm.c-out-no-root", EDM, "sigma * sigma_data / total.sqrt(), 1.0 / total.sqrt()",
           "sigma * sigma_data / total, 1.0 / total.sqrt()", ("tests/test_edm.py",),
           "c_out = sigma sigma_data / (sigma^2 + sigma_data^2), without the square root (Table 1)"),
    Mutant("edm.c-noise-half", EDM, "1.0 / total.sqrt(), sigma.log() / 4", "1.0 / total.sqrt(), sigma.log() / 2",
           ("tests/test_edm.py",), "c_noise = ln(sigma) / 2 instead of / 4"),
    Mutant("ema.bank-no-warmup-cap", EMA, "return min(decay, (1 + self.num_updates) / (10 + self.num_updates))",
           "return (1 + self.num_updates) / (10 + self.num_updates)", ("tests/test_ema_bank.py",),
           "the warm-up ignores the decay: d_n grows past the chosen decay towards 1"),
    Mutant("posthoc.profile-exponent", POSTHOC, "return (1.0 - 1.0 / t) ** (gamma + 1.0)",
           "return (1.0 - 1.0 / t) ** gamma", ("tests/test_posthoc_ema.py",),
           "the power EMA's beta_t = (1 - 1/t)^gamma instead of ^(gamma + 1) (EDM2 Eq. 3)"),
    Mutant("lr.warmup-starts-at-zero", LR, "return lr * (step + 1) / warmup_steps", "return lr * step / warmup_steps",
           ("tests/test_lr_schedules.py",), "the warm-up's first step has learning rate 0"),
    Mutant("lr.inverse-sqrt-no-root", LR, "return lr / math.sqrt(max(step / t_ref, 1.0))",
           "return lr / max(step / t_ref, 1.0)", ("tests/test_lr_schedules.py",),
           "EDM2's inverse square-root decay decays as 1/t"),
    Mutant("conditions.augment-level-ignored", COND, "return torch.cat([c + level * noise, plane], dim=1)",
           "return torch.cat([c + noise, plane], dim=1)", ("tests/test_image_conditions.py",),
           "the condition's noise augmentation ignores its level"),
    Mutant("sampling.start-not-checked", SAMPLING, "        if timesteps[0] != start:",
           "        if False:", ("tests/test_sampling_driver.py", "tests/test_editing.py"),
           "a spacing that does not start at t0 (SDEdit) is not refused: the edit starts elsewhere"),
    Mutant("files.nan-pixels-accepted", IMAGE_FILES, 'if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():',
           "if False:", (REFUSALS,), "a float TIFF with NaN pixels is read as zeros"),
    Mutant("resolve.overridden-file-values-unchecked", RESOLVE, "        if not overridden:\n            continue",
           "        if True:\n            continue", (REFUSALS,),
           "a TOML value that an option overrides is never validated (batch_size = -8 under --batch-size)"),
    Mutant("cli.empty-out-accepted", PARSER, "            action.type = _output_path", "            pass", (REFUSALS,),
           "--out '' is the current directory"),
    Mutant("sample.evaluations-unbounded", "src/ddpm/sample_job.py", "    if images * steps > MAX_EVALUATIONS:", "    if False:",
           (REFUSALS,), "--num-images x --steps is not bounded"),
    Mutant("estimates.long-run-silent", "src/ddpm/estimates.py",
           "    if total <= LONG_RUN_SECONDS or 0 < limit <= LONG_RUN_SECONDS:", "    if True:", (REFUSALS,),
           "a run estimated at days starts without a word"),
    Mutant("estimates.time-limit-ignored", "src/ddpm/estimates.py",
           "    if total <= LONG_RUN_SECONDS or 0 < limit <= LONG_RUN_SECONDS:", "    if total <= LONG_RUN_SECONDS:",
           (REFUSALS,), "the warning ignores a --time-limit that stops the run within the day"),
    Mutant("init.eager-torch", "src/ddpm/__init__.py",
           "from .errors import CheckpointError, ConfigError, DataError, DdpmError\n",
           "from .errors import CheckpointError, ConfigError, DataError, DdpmError\nfrom .models import Unet\n",
           ("tests/test_interrupt_at_start.py",), "import ddpm imports torch: Ctrl-C during start-up is a traceback"),
    Mutant("distill.data-checked-late", "src/ddpm/distill.py",
           "        load_dataset(data_cfg.name, data_root=data_cfg.root,", "        (data_cfg.name, dict(data_root=data_cfg.root,",
           (f"{CORPUS}::test_bad_input_gives_one_line_and_changes_nothing[distill-empty-data]",),
           "distill --data with unreadable data creates its run directory before the refusal"),
]


def run_mutant(m: Mutant, work: Path, timeout: float) -> tuple[str, float]:
    """Apply ``m`` inside the copy ``work``, run its tests there, restore the file: (verdict, seconds)."""
    path = work / m.file
    text = path.read_text()
    count = text.count(m.original)
    if count != 1:
        return ("stale" if count == 0 else f"ambiguous ({count} matches)"), 0.0
    path.write_text(text.replace(m.original, m.replacement))
    env = {**os.environ, "PYTHONPATH": str(work / "src"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", *m.tests],
                              cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        verdict = "survived" if proc.returncode == 0 else ("caught" if proc.returncode == 1 else f"error ({proc.returncode})")
        if proc.returncode not in (0, 1):
            verdict += ": " + (proc.stdout + proc.stderr).strip().splitlines()[-1][:120]
    except subprocess.TimeoutExpired:
        verdict = "caught (timeout)"
    finally:
        path.write_text(text)
    return verdict, time.time() - start


def check_copy_is_imported(work: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(work / "src")}
    found = subprocess.run([sys.executable, "-c", "import ddpm; print(ddpm.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True).stdout.strip()
    if not Path(found).resolve().is_relative_to((work / "src").resolve()):
        sys.exit(f"mutate.py: the copy's ddpm is not the one imported ({found}); is ddpm installed non-editable?")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help="run the mutants whose name contains one of these words")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant (a timeout counts as caught)")
    p.add_argument("--log", help="also append the result lines to this file")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or any(w in m.name for w in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.description}{'  [equivalent]' if m.equivalent else ''}")
        return 0
    log = open(args.log, "a", encoding="utf-8") if args.log else None

    def say(line: str) -> None:
        print(line, flush=True)
        if log:
            log.write(line + "\n")
            log.flush()

    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="ddpm-mutants-") as tmp:
        work = Path(tmp)
        for item in ("src", "tests", "pyproject.toml", "scripts", "docs", "README.md"):
            source = ROOT / item
            if source.is_dir():
                shutil.copytree(source, work / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            elif source.exists():
                shutil.copy2(source, work / item)
        check_copy_is_imported(work)
        for m in chosen:
            if m.equivalent:
                verdict, seconds = "equivalent", 0.0
            else:
                verdict, seconds = run_mutant(m, work, args.timeout)
            key = verdict.split(" ")[0].rstrip(":")
            counts[key] = counts.get(key, 0) + 1
            say(f"{verdict:18s} {seconds:6.1f}s  {m.name:40s} {m.description}"
                + (f"  ({m.equivalent})" if m.equivalent else ""))
    caught, survived = counts.get("caught", 0), counts.get("survived", 0)
    errors = sum(v for k, v in counts.items() if k not in ("caught", "survived", "equivalent", "stale"))
    say(f"score: {caught} caught / {caught + survived} run ({counts.get('equivalent', 0)} equivalent, "
        f"{counts.get('stale', 0)} stale, {errors} errors)")
    return 0 if survived == 0 and errors == 0 and not counts.get("stale") else 1


if __name__ == "__main__":
    sys.exit(main())
