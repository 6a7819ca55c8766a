#!/usr/bin/env bash
# Run TransVW pretraining on every worker of a Cloud TPU VM pod slice.
#
#   TPU_NAME=my-v4-64 ZONE=us-central2-b REPO=/home/me/transvw-jax WORKDIR=/mnt/disks/shared/runs/pod \
#     launch/tpu_pod.sh [extra main.py flags, e.g. --config.train.steps=2000]
#
# REPO and WORKDIR are paths on the workers (absolute: a local ~ would expand to this
# machine's home). Extra flags go to every worker, quoted as given; EXTRA="..." (a
# string inserted as is into the remote command) works too.
#
# The same command runs on all workers (--worker=all). Each worker is one JAX process:
# jax.distributed detects the pod from the TPU VM environment (config.parallel.distributed
# = "auto"), so no coordinator address, process count or id is passed.
#
# Before the first run:
#   - the repository is at $REPO on every worker with the package installed
#     (e.g. gcloud ... --worker=all --command "cd $REPO && pip install -e . 'jax[tpu]'");
#   - the visual-word store was written once by discovery on one machine and sits on
#     storage mounted at the same path on every worker (configs/tpu_pod.py:
#     data.store_dir, override with --config.data.store_dir=...);
#   - $WORKDIR is on shared storage mounted at the same path on every worker (NFS /
#     Filestore, gcsfuse): every process writes its checkpoint shards there and process 0
#     the metrics and exports. gs:// URLs are not supported.
# Optional: CONFIG (default configs/tpu_pod.py; configs/tpu_pod.py:released for the
# released cubes), PYTHON (default python3; e.g. the venv's python on the workers).
# A worker still running an earlier job holds its TPU ("TPU in use"): stop that first.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
fi
missing=()
for var in TPU_NAME ZONE REPO WORKDIR; do
  [[ -n "${!var:-}" ]] || missing+=("$var")
done
if ((${#missing[@]})); then
  echo "error: set ${missing[*]}" >&2
  usage
fi

CONFIG="${CONFIG:-configs/tpu_pod.py}"
PYTHON="${PYTHON:-python3}"
# Extra flags, quoted for the remote shell (so values like "('pretrain',)" survive).
EXTRA="${EXTRA:+ $EXTRA}"
if (($#)); then
  EXTRA+="$(printf ' %q' "$@")"
fi

REMOTE="cd $(printf '%q' "$REPO") && $PYTHON -m transvw_jax.main --config $(printf '%q' "$CONFIG")"
REMOTE+=" --workdir $(printf '%q' "$WORKDIR")$EXTRA"
echo "on all workers of $TPU_NAME ($ZONE): $REMOTE" >&2

exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$REMOTE"
