#!/bin/bash
# A/B of the 'hybrid' conv's Winograd kernel gradient: network training images/s (scan mode,
# cifar_flax.bench) with it ('winograd') and with the native kernel-gradient convolution
# everywhere ('native', WINOGRAD_MIN_SIZE patched out), interleaved per network; oneDNN's
# convolutions off in both (they take most of these layers where libdnnl-dev is installed).
#   bash tools/winograd_ab_bench.sh [DATA] > results/winograd/network_bench.jsonl
DATA=${1:-../shared/data/cifar10-jpeg}
export TF_CPP_MIN_LOG_LEVEL=3
bench() { # variant model batch steps
  local patch="layers.ONEDNN_CONV = False;"
  [ "$1" = native ] && patch="$patch layers.WINOGRAD_MIN_SIZE = 10 ** 9;"
  python -c "import sys; from cifar_flax.models import layers; $patch from cifar_flax import bench; bench.main(sys.argv[1:])" \
    --model "$2" --batch "$3" --mode scan --steps "$4" --no-eval --data "$DATA" | sed "s/^/$1 /"
}
for spec in "resnet18 128 3" "vgg16 128 3" "inception10 128 10" "alexnet8 128 8" "resnet18 32 8" "vgg16 32 8"; do
  set -- $spec
  bench native "$1" "$2" "$3"; bench winograd "$1" "$2" "$3"
done
