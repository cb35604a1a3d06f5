#!/usr/bin/env bash
# The peer libraries of benchmarks/peers.py and image_throughput.py (no dependency of flowmatch), into the
# ACTIVE virtual environment:   . .venv/bin/activate && bash benchmarks/install_peers.sh
# torch must stay the CPU build of constraints.txt: the peers declare torchvision, which pip would resolve by
# replacing torch. So the peers (with torchdyn, torchcfm's sampler, and pytorch-lightning, which it imports) go
# in with --no-deps, then only the pure-python requirements of what the benchmarks import, under -c
# constraints.txt; torchvision stays absent (peer_adapters.py puts an inert placeholder in its place).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! python -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  echo "install_peers.sh: activate the project's virtual environment first (. .venv/bin/activate)" >&2
  exit 2
fi
torch_before="$(python -c 'import torch; print(torch.__version__)')"
python -m pip install --no-deps torchcfm==1.0.7 flow-matching==1.0.10 rectified-flow-pytorch==0.14.0 torchdyn==1.0.6 \
  pytorch-lightning==2.6.6
python -m pip install -c "$root/constraints.txt" attrs==26.1.0 torchsde==0.2.6 torchcde==0.2.5 torchmetrics==1.9.0 \
  lightning-utilities==0.15.3 einops==0.8.2 einx==0.4.3 ema-pytorch==0.8.3 x-unet==0.5.0 x-transformers==2.31.10 \
  torch-einops-utils==0.2.0
torch_after="$(python -c 'import torch; print(torch.__version__)')"
if [ "$torch_before" != "$torch_after" ]; then
  echo "install_peers.sh: torch changed from $torch_before to $torch_after; reinstall it from constraints.txt" >&2
  exit 1
fi
echo "torch unchanged: $torch_after"
python "$root/benchmarks/peers.py" --list
