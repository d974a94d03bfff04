"""The library's names that the parser offers as choices, repeated here so that building the parser
imports no torch (``ddpm --help`` answers at once). Each equals its source, in its order;
tests/test_cli_vocabulary.py checks that they stay equal."""

PRESETS = ("cifar10", "celebahq256", "digits", "mnist")                 # ddpm.models.PRESETS
SCHEDULES = ("linear", "cosine", "sigmoid")                             # ddpm.schedules.SCHEDULES
VARIANCES = ("posterior", "beta", "learned-range")                      # ddpm.diffusion.VARIANCES
SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "euler", "heun", "euler-ancestral", "dpm-solver++-sde")
                                                                        # ddpm.samplers.SAMPLERS
SPACINGS = ("leading", "trailing", "linspace")                          # ddpm.samplers.SPACINGS
SPACING_CHOICES = (*SPACINGS, "karras")                                 # ddpm.samplers.SPACING_CHOICES
DEFAULT_GUIDANCE_SCALE = 2.0                                            # ddpm.generate.DEFAULT_GUIDANCE_SCALE
EVAL_METRICS = ("bpd", "bpd-ode", "fid", "kid", "pr", "is", "fast")     # ddpm.evaluation.pipeline.EVAL_METRICS
INCEPTION_RESIZE_MODES = ("tensorflow", "pytorch-fid")          # ddpm.evaluation.features.INCEPTION_RESIZE_MODES
DISTILL_WEIGHTINGS = ("snr+1", "truncated-snr")                         # ddpm.distill.DISTILL_WEIGHTINGS

# The library module and name of each, for the test that keeps them equal.
SOURCES = {"PRESETS": "ddpm.models", "SCHEDULES": "ddpm.schedules", "VARIANCES": "ddpm.diffusion",
           "SAMPLERS": "ddpm.samplers", "SPACINGS": "ddpm.samplers", "SPACING_CHOICES": "ddpm.samplers",
           "DEFAULT_GUIDANCE_SCALE": "ddpm.generate", "EVAL_METRICS": "ddpm.evaluation.pipeline",
           "INCEPTION_RESIZE_MODES": "ddpm.evaluation.features", "DISTILL_WEIGHTINGS": "ddpm.distill"}
