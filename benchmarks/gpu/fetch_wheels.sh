#!/usr/bin/env bash
# Download, on this (networked) machine, the pure-Python wheels that the device machine lacks:
# its image has torch, linear_operator, scipy, tqdm, einops, opt-einsum, torchmetrics and pytest,
# but not the peer libraries of the benchmarks. They land in .whl/ (ignored by git), which the
# device call carries: run(command="bash benchmarks/gpu/session.sh", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PY=${PYTHON:-python3}
for req in backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 asdfghjkl==0.1a5 laplace-torch==0.5.1 \
           curvlinops-for-pytorch==3.0.1 einconv==0.1.0; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl "$req"
done
ls -l .whl
du -sh .whl
