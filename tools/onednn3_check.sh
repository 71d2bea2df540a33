#!/usr/bin/env bash
# The oneDNN handlers' tests against oneDNN 3.x (their 3.x API path: csrc/onednn_conv.cc's
# DNNL_VERSION_MAJOR >= 3 branches), from PyPI's `onednn` and `onednn-devel` wheels:
#
#   bash tools/onednn3_check.sh [VENV]      (run from the repository root, its venv active)
#
# The wheels (about 600 MB with what they pull in: a SYCL and OpenCL runtime, TBB) go into a
# venv of their own (VENV, default /tmp/onednn3-venv); the project's python runs the tests, the
# handlers compiled against those headers into a fresh cache and linked to that library. That
# oneDNN is built for SYCL: its CPU engine is an OpenCL CPU device, which the OpenCL loader finds
# only when pointed at the wheel's runtime (OCL_ICD_FILENAMES); without it engine creation fails
# ("SYCL cpu devices queried but not found") and onednn.available() says no.
# Measured on 2026-12-05 (oneDNN v3.13.2, "cpu,runtime:SYCL,nthr:2", the AVX-512 Xeon): the
# tests pass; training ran 0.45-0.94x as fast as on Debian's OpenMP build of 2.6.3
# (docs/performance.md), so the project's route stays Debian's libdnnl-dev.
set -euo pipefail
VENV=${1:-/tmp/onednn3-venv}
[ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q onednn onednn-devel
export XDG_CACHE_HOME
XDG_CACHE_HOME=$(mktemp -d)
export CPATH=$VENV/include LIBRARY_PATH=$VENV/lib LD_LIBRARY_PATH=$VENV/lib
export OCL_ICD_FILENAMES=$VENV/lib/libintelocl.so
ONEDNN_VERBOSE=1 python -c 'from cifar_flax.models import onednn; onednn.require()' 2>&1 \
  | grep -E 'info,oneDNN|cpu,runtime' || true
python -m pytest -q -p no:cacheprovider tests/test_onednn.py tests/test_models.py -k 'onednn or hybrid or fold'
