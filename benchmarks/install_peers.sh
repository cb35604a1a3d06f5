#!/usr/bin/env bash
# The peer libraries that benchmarks/peers.py compares flowmatch with, for benchmarking only (they
# are no dependency of flowmatch), installed into the ACTIVE virtual environment:
#
#   . .venv/bin/activate && bash benchmarks/install_peers.sh
#
# torch must stay the CPU build that is installed (constraints.txt pins torch==2.13.0): the peers
# and torchdyn declare torchvision (torchdyn also ipykernel, ipywidgets, poethepoet, ...), and pip
# resolving those would replace torch with a multi-GB CUDA build, or add a torchvision that does
# not import beside this torch. So:
#   1. the peers (and torchdyn, torchcfm's sampler, and pytorch-lightning, which torchdyn imports
#      but whose full requirements pull in aiohttp & co.) go in with --no-deps;
#   2. of their requirements, only the pure-python ones that importing what peers.py uses needs
#      go in with ordinary pip, under -c constraints.txt so torch cannot move:
#        torchcfm.conditional_flow_matching  numpy, scipy, POT (already there: flowmatch needs them)
#        torchdyn.core (torchcfm's sampler)  attrs, torchsde, torchcde, torchmetrics, lightning-utilities
#        flow_matching.path / .solver        numpy, torchdiffeq (already there)
#        rectified_flow_pytorch              einops, einx, ema-pytorch, x-unet, x-transformers,
#                                            torch-einops-utils; torchvision stays absent (peer_adapters.py
#                                            puts an inert placeholder in its place, see there)
# pip check will still list the requirements left out (torchvision, pandas, absl-py, ipykernel,
# ...): none is imported by the benchmark. pip's "dependency resolver does not currently take into
# account..." message in step 2 is the same thing and not a failure.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! python -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  echo "install_peers.sh: activate the project's virtual environment first (. .venv/bin/activate)" >&2
  exit 2
fi
torch_before="$(python -c 'import torch; print(torch.__version__)')"

python -m pip install --no-deps \
  torchcfm==1.0.7 \
  flow-matching==1.0.10 \
  rectified-flow-pytorch==0.14.0 \
  torchdyn==1.0.6 \
  pytorch-lightning==2.6.6

python -m pip install -c "$root/constraints.txt" \
  attrs==26.1.0 torchsde==0.2.6 torchcde==0.2.5 torchmetrics==1.9.0 lightning-utilities==0.15.3 \
  einops==0.8.2 einx==0.4.3 ema-pytorch==0.8.3 x-unet==0.5.0 x-transformers==2.31.10 torch-einops-utils==0.2.0

torch_after="$(python -c 'import torch; print(torch.__version__)')"
if [ "$torch_before" != "$torch_after" ]; then
  echo "install_peers.sh: torch changed from $torch_before to $torch_after; reinstall it from constraints.txt" >&2
  exit 1
fi
echo "torch unchanged: $torch_after"
python "$root/benchmarks/peers.py" --list
