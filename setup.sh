#!/usr/bin/env bash
# Set up mmdp on a fresh Debian/Ubuntu machine: the Fashion-MNIST reference data
# (Debian package), a virtual environment in .venv, and mmdp with its test extras
# at the pinned versions in constraints.txt. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# constraints.txt pins what installs fast here (loose botocore/boto3
# cost pip minutes of backtracking); pyproject.toml keeps the ranges.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
echo "mmdp is set up in .venv"
