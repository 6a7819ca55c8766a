#!/usr/bin/env bash
# Run TransVW pretraining on every worker of a Cloud TPU VM pod slice, in the background.
#
#   export TPU_NAME=my-v4-64 ZONE=us-central2-b REPO=/home/me/transvw-jax \
#          WORKDIR=/mnt/disks/shared/runs/pod
#   launch/tpu_pod.sh setup                     # once: a Python 3.11 venv on every worker
#   launch/tpu_pod.sh run [main.py flags]       # start (or resume) the job; returns at once
#   launch/tpu_pod.sh [main.py flags]           # the same as run
#   launch/tpu_pod.sh status                    # running or not, and the last log line, per worker
#   launch/tpu_pod.sh logs [N] [-f]             # the last 100 lines of worker N's log (default 0)
#   launch/tpu_pod.sh stop                      # SIGTERM to every worker's job
#
# REPO and WORKDIR are absolute paths on the workers (a local ~ would expand to this
# machine's home). Extra flags go to every worker, quoted as given (so values like
# --config.stages="('pretrain',)" survive); EXTRA="..." (a string inserted as is into the
# remote command line) works too.
#
# setup: stock TPU VM images run Python 3.10 and the project needs >= 3.11. `setup` creates
# ONE virtual environment per worker at $VENV (default ~/.venvs/transvw-jax on each
# worker's own disk) with uv (installed into ~/.local/bin when missing; `uv venv --python
# 3.11` downloads a standalone CPython 3.11 when the image has none), then installs the
# checkout at $REPO into it with jax[tpu]. The system python and pip are not touched.
# Re-running it updates the install.
#
# run: the same command on all workers (--worker=all), each worker one JAX process under
# nohup/setsid, detached from the ssh session, so the launcher returns once every worker
# has started and the job survives a closed laptop. jax.distributed detects the pod from
# the TPU VM's metadata (config.parallel.distributed = "auto"): no coordinator address,
# process count or id is passed. Worker N appends its output to $LOGDIR/worker-N.log and
# its pid to $LOGDIR/worker-N.pid (LOGDIR default $WORKDIR/logs). N is the worker's index
# as JAX sees it: TPU_WORKER_ID when set (GKE), else the metadata server's
# agent-worker-number (what jax.distributed reads on TPU VMs), else the hostname's
# "-w-N" suffix. A worker whose previous job still runs refuses to start a second one
# (it would hold the TPU): `stop` first. Resuming is `run` again: the latest checkpoint in
# WORKDIR is restored.
#
# stop: SIGTERM to each worker's process (the pid file), which lets it stop cleanly.
#
# Before the first run:
#   - the repository is at $REPO on every worker (e.g. on shared storage, or cloned on each);
#   - the visual-word store was written once by discovery on one machine and sits on
#     storage mounted at the same path on every worker (configs/tpu_pod.py:
#     data.store_dir, override with --config.data.store_dir=...);
#   - $WORKDIR is on shared storage mounted at the same path on every worker (NFS /
#     Filestore, gcsfuse): every process writes its checkpoint shards there and process 0
#     the metrics and exports.
# Optional: CONFIG (default configs/tpu_pod.py; configs/tpu_pod.py:released for the
# released cubes), VENV (see setup), PYTHON (default $VENV/bin/python), LOGDIR, LOG_LINES (logs, default 100).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# Quote for a POSIX shell: the remote login shell, whatever it is, reads this back.
sq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

CMD=run
case "${1:-}" in
  -h | --help) usage ;;
  setup | run | status | logs | stop) CMD=$1; shift ;;
esac

missing=()
for var in TPU_NAME ZONE REPO WORKDIR; do
  [[ -n "${!var:-}" ]] || missing+=("$var")
done
if ((${#missing[@]})); then
  echo "error: set ${missing[*]}" >&2
  usage
fi
LOGDIR="${LOGDIR:-$WORKDIR/logs}"
for var in REPO LOGDIR; do
  if [[ "${!var}" != /* ]]; then
    echo "error: $var=${!var} must be an absolute path on the workers" >&2
    exit 2
  fi
done

CONFIG="${CONFIG:-configs/tpu_pod.py}"
VENV="${VENV:-}"      # empty: ~/.venvs/transvw-jax, expanded on each worker
PYTHON="${PYTHON:-}"  # empty: $VENV/bin/python

# Every remote script starts with the same definitions, values quoted here, and finds its
# worker index the way jax.distributed does (see the header).
PRELUDE="REPO=$(sq "$REPO") WORKDIR=$(sq "$WORKDIR") LOGDIR=$(sq "$LOGDIR") CONFIG=$(sq "$CONFIG")"
PRELUDE+=" VENV=$(sq "$VENV") PYTHON=$(sq "$PYTHON")"
read -r -d '' COMMON <<'EOF' || true
set -eu
VENV="${VENV:-$HOME/.venvs/transvw-jax}"
PYTHON="${PYTHON:-$VENV/bin/python}"
W="${TPU_WORKER_ID:-}"
if [ -z "$W" ] && command -v curl >/dev/null 2>&1; then
  W="$(curl -sf -m 5 -H 'Metadata-Flavor: Google' \
    "http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes/agent-worker-number" || true)"
fi
case "$W" in
  '' | *[!0-9]*)
    case "$(hostname)" in
      *-w-[0-9]*) W="$(hostname)"; W="${W##*-w-}" ;;
      *) echo "$(hostname): cannot tell this worker's index (no TPU_WORKER_ID, metadata or -w-N hostname)" >&2; exit 1 ;;
    esac ;;
esac
LOG="$LOGDIR/worker-$W.log"
PIDFILE="$LOGDIR/worker-$W.pid"
running() {  # the pid in PIDFILE when it is this job's process (a pid may be reused)
  [ -s "$PIDFILE" ] || return 1
  pid="$(cat "$PIDFILE")"
  kill -0 "$pid" 2>/dev/null && grep -q transvw_jax "/proc/$pid/cmdline" 2>/dev/null
}
EOF

read -r -d '' SETUP <<'EOF' || true
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
  curl -LsSf https://astral.sh/uv/install.sh | sh >/dev/null  # installs ~/.local/bin/uv
fi
if ! "$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  uv venv --allow-existing --python 3.11 "$VENV"  # over an older (3.10) venv at that path too
fi
cd "$REPO"
uv pip install --python "$VENV/bin/python" -e . 'jax[tpu]'
# No TPU call here: jax.devices() on some workers only would wait for the others.
echo "worker $W: $("$VENV/bin/python" -c 'import sys, jax; print("python", sys.version.split()[0], "jax", jax.__version__)') in $VENV"
EOF

read -r -d '' RUN <<'EOF' || true
mkdir -p "$LOGDIR"
if running; then
  echo "worker $W: a job is still running (pid $pid, $PIDFILE): launch/tpu_pod.sh stop first" >&2
  exit 1
fi
if [ ! -x "$PYTHON" ]; then
  echo "worker $W: no $PYTHON: run launch/tpu_pod.sh setup first" >&2
  exit 1
fi
cd "$REPO"
rm -f "$PIDFILE"
echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) worker $W on $(hostname): $PYTHON -m transvw_jax.main $*" >>"$LOG"
# setsid + nohup: no SIGHUP when the ssh session closes; stdin and both outputs redirected
# so ssh does not wait for them. The inner shell writes its own pid (then execs python, so
# it is python's) into PIDFILE for status and stop.
setsid nohup sh -c 'echo $$ >"$0"; exec "$@"' "$PIDFILE" \
  "$PYTHON" -u -m transvw_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@" \
  >>"$LOG" 2>&1 </dev/null &
i=0
while [ ! -s "$PIDFILE" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
echo "worker $W: started pid $(cat "$PIDFILE" 2>/dev/null || echo '?'), log $LOG"
EOF

read -r -d '' STATUS <<'EOF' || true
if running; then state="running (pid $pid)"; else state="not running"; fi
echo "worker $W: $state; last log line: $(tail -n 1 "$LOG" 2>/dev/null || echo '(no log)')"
EOF

read -r -d '' STOP <<'EOF' || true
if running; then
  kill -TERM "$pid" && echo "worker $W: SIGTERM sent to pid $pid"
else
  echo "worker $W: not running"
fi
EOF

WORKER=all
ARGS=""
case "$CMD" in
  setup) BODY=$SETUP ;;
  run)
    BODY=$RUN
    for a in "$@"; do ARGS+=" $(sq "$a")"; done
    ARGS+="${EXTRA:+ $EXTRA}"
    ;;
  status) BODY=$STATUS ;;
  stop) BODY=$STOP ;;
  logs)
    WORKER="${1:-0}"
    [[ "$WORKER" =~ ^[0-9]+$ ]] || { echo "error: logs takes a worker index, got $WORKER" >&2; exit 2; }
    FOLLOW=""
    [[ "${2:-}" == "-f" ]] && FOLLOW=" -F"
    BODY="tail -n ${LOG_LINES:-100}$FOLLOW \"\$LOG\""
    ;;
esac

# One script for `sh -c`; the extra flags arrive as its positional parameters ("$@").
REMOTE="$PRELUDE sh -c $(sq "$COMMON
$BODY") tpu_pod$ARGS"
echo "tpu_pod.sh $CMD on worker(s) $WORKER of $TPU_NAME ($ZONE)" >&2
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="$WORKER" --command "$REMOTE"
