#!/usr/bin/env bash
# Runs the int8 and ONNX checks on an emulated x86 CPU without VNNI and without AVX-512
# (QEMU's Haswell model: AVX2 only), where fbgemm's and onnxruntime's u8 x s8 kernels add
# products in saturating int16 pairs. fbgemm can be capped at AVX2 on any CPU
# (tests/test_int8_overflow.py does it); onnxruntime cannot, hence QEMU. Slow (a few minutes):
# a check to run by hand, not part of `make test`.
#
#   apt-get install qemu-user        # Debian/Ubuntu; provides qemu-x86_64
#   bash scripts/check_without_vnni.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-x86_64 >/dev/null; then
  echo "qemu-x86_64 is missing: apt-get install qemu-user" >&2
  exit 1
fi
export TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions" NNCF_EXTENSION_LOAD_TIMEOUT=0
exec qemu-x86_64 -cpu Haswell .venv/bin/python -c '
import sys, torch
capability = torch.backends.cpu.get_cpu_capability()
print(f"emulated CPU capability: {capability}", flush=True)
if capability != "AVX2":
    sys.exit(f"expected an AVX2-only CPU, torch sees {capability}")
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
' \
  "tests/test_adapter_conformance.py::test_adapter_conforms" -k "onnx_export or int8" \
  tests/test_adapter_fx.py tests/test_int8_overflow.py \
  "tests/test_reconstruction.py::test_fx_still_converts_to_int8_after_reconstruction" "$@" \
  2> >(grep -v "TCG doesn't support requested feature" >&2)
