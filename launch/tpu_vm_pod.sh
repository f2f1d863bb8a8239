#!/bin/bash
# Train on a Cloud TPU VM pod slice: the same command on every worker, one
# JAX process per host (jax.distributed.initialize() finds the pod's
# coordinator by itself on TPU VMs).
#
#   TPU=my-v4-32 ZONE=us-central2-b bash launch/tpu_vm_pod.sh configs/s4.py:pvt2 \
#       gs://bucket/runs/s4 --config.train.batch_size=16
#
# --config.train.batch_size (clips per step, all chips together) must be a
# multiple of the slice's JAX devices (16 on a v4-32); the configs' 2 is
# refused on a pod.
# Further arguments go to main.py, e.g. --config.model.scan_layers=True:
# XLA:TPU compiles the PVTv2-B5 train step 2.6x faster with the layers
# scanned, in 12% less memory (benchmarks/README.md, "TPU without a TPU").
# With more than ~2 clips per chip add --config.model.remat=True (S4
# PVTv2-B5 at 4 clips per v5e chip needs 21 GB without it, 2.7 GB with),
# and --config.train.prng_impl=rbg (~5% faster by XLA:TPU's cost model:
# benchmarks/README.md, "TPU step time without a TPU"); for AVSS (10
# frames a clip) --config.model.dropout_impl=hash instead: 8% faster there
# and 7.7 GB instead of 10.9 at 4 clips per v5e chip.
#
# The workdir and data_dir must be on storage every host reaches: gs:// URLs
# work (orbax writes checkpoints there itself, our logs and results go
# through etils.epath + gcsfs, tensorboardX uses google-cloud-storage, both
# in the `tpu` extra; array_record reads gs:// datasets). Set REPO to a git
# URL or leave it to copy this tree.
# Spot / preemptible TPU VMs: on the shutdown notice (SIGTERM) every host
# saves the same step and stops (JAX's preemption service); run this script
# again to resume from it. The same happens when this ssh session ends (a
# Ctrl-C here, a dropped connection): each host saves the same step as its
# output pipe closes, so nothing is lost; to keep training without the
# session, run the last command below under nohup or tmux on the workers.
# Tested on: NOT run on a TPU pod (none available to the project); the
# multi-process data, checkpoint and evaluation paths run in CI as two JAX
# processes on one CPU host (tests/test_trainer.py::test_two_processes).
# Checked with `bash -n`.
set -euo pipefail
CONFIG=${1:?config}
WORKDIR=${2:?workdir (gs://...)}
shift 2
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
DATA_DIR=${DATA_DIR:?set DATA_DIR to the prepared TFDS dir (gs://...)}
run() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }
if [[ -n "${REPO:-}" ]]; then
  run "git clone $REPO avsegformer-jax || (cd avsegformer-jax && git pull)"
else
  gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all "$(pwd)" "$TPU":avsegformer-jax
fi
run "cd avsegformer-jax && pip install -q -e '.[tpu]'"
run "cd avsegformer-jax && python main.py --distributed --config=$CONFIG \
  --workdir=$WORKDIR --config.data.data_dir=$DATA_DIR $*"
