#!/usr/bin/env bash
# Makes Fashion-MNIST available: the Debian package when running as root, otherwise says how.
set -euo pipefail
debian_dir=/usr/share/datasets/fashion-mnist
have() { [ -n "${1:-}" ] && [ -e "$1/train-images-idx3-ubyte.gz" -o -e "$1/train-images-idx3-ubyte" ]; }
if have "${ZSQ_DATA_DIR:-}" || have "$debian_dir"; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "Fashion-MNIST is missing. Install it as root with:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist" >&2
  echo "or put the four IDX files in a folder and set ZSQ_DATA_DIR=/that/folder" >&2
  exit 1
fi
