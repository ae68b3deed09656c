#!/usr/bin/env bash
# Creates bench/.venv-nt, a virtual environment with neural-tangents for the side-by-side
# benchmarks. It is separate from the tfntk environment because neural-tangents 0.6.5 needs
# jax 0.4.23 and numpy < 2, while tfntk runs on numpy 2. tf2jax (a neural-tangents dependency)
# imports TensorFlow, so the venv gets its own TensorFlow, pinned to the version that installed
# and imported with numpy 1.26 here.
#
# Usage: bash bench/setup_neural_tangents.sh [PYTHON]   (PYTHON defaults to python3.11)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${here}/.venv-nt"
python="${1:-python3.11}"

if [[ ! -x "${venv}/bin/python" ]]; then
  "${python}" -m venv "${venv}"
fi

"${venv}/bin/python" -m pip install --quiet --upgrade pip
"${venv}/bin/python" -m pip install --quiet \
  "neural-tangents==0.6.5" \
  "jax==0.4.23" \
  "jaxlib==0.4.23" \
  "numpy==1.26.4" \
  "ml_dtypes==0.5.4" \
  "tf2jax==0.3.6" \
  "tensorflow==2.21.0" \
  "frozendict==2.5.1" \
  "scipy==1.17.1" \
  "absl-py==2.5.1" \
  "psutil==7.2.2"

"${venv}/bin/python" - <<'PY'
import jax
import neural_tangents

print(f"neural-tangents imported, jax {jax.__version__}, devices {jax.devices()}")
PY
echo "Ready: ${venv}/bin/python"
