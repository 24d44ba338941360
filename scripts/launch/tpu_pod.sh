#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every TPU VM worker at once.
#
#   scripts/launch/tpu_pod.sh TPU_NAME ZONE [dsv2 train arguments...]
#   scripts/launch/tpu_pod.sh my-v5p-128 us-east5-a --config v2-lite --mesh fsdp=16,expert=4 \
#       --workdir /mnt/bucket/runs/v2-lite --data "jsonl:/data/*.jsonl,tokenizer=/data/tok.json"
#
# Each worker joins the run by itself (dsv2 detects the TPU pod: no --coordinator flags),
# so the only requirements are the same code, data paths and workdir on every worker: the
# workdir a directory every host can write, e.g. a bucket mounted at the same path on each
# worker (gcsfuse) or a shared filesystem; a gs:// URL is refused. Process 0 writes
# config.json, run.json and metrics.jsonl.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n 2,12p "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
HERE=$(cd "$(dirname "$0")/../.." && pwd)
# This checkout, copied to every worker (git archive: tracked files only).
git -C "$HERE" archive --format=tar.gz -o /tmp/dsv2-jax.tar.gz HEAD
gcloud compute tpus tpu-vm scp /tmp/dsv2-jax.tar.gz "$TPU_NAME":~/ --zone "$ZONE" --worker=all
# Quote every argument once for the remote shell.
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  mkdir -p dsv2-jax && tar -xzf dsv2-jax.tar.gz -C dsv2-jax && cd dsv2-jax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]'
  dsv2 train$ARGS
"
