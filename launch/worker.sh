#!/usr/bin/env bash
# Runs one training stage on this host of a slice: a TPU VM worker (started by
# launch/run.sh) or a GKE pod (launch/jobset.yaml). Sets the TPU environment, runs the
# trainer with its output in logs/HOST.log, passes SIGTERM on to it (the trainer saves a
# checkpoint and exits; rerunning resumes), and copies the log to WORKDIR/logs/ at exit.
#
#   launch/worker.sh --workdir=gs://BUCKET/RUN --config=configs/stages/pretrain.py:mobilemoe_s
#                    [--python=../venv/bin/python] [--libtpu_args='...'] [--log_dir=logs]
#                    [--dry_run]
#                    [-- --config.train.steps=1000 ...]
#
# JAX finds the other workers itself on TPU (metadata server, or TPU_WORKER_* on GKE).

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

WORKDIR="" CONFIG="" PYTHON="" LOG_DIR=logs LIBTPU_ARGS="${LIBTPU_INIT_ARGS:-$DEFAULT_LIBTPU_ARGS}"
while (($#)); do
  common_flag "$1" || case "$1" in
    --workdir=*) WORKDIR="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --libtpu_args=*) LIBTPU_ARGS="${1#*=}" ;;
    --log_dir=*) LOG_DIR="${1#*=}" ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
require "$WORKDIR" --workdir "gs://BUCKET/RUN"
require "$CONFIG" --config "a stage config, e.g. configs/stages/pretrain.py:mobilemoe_s"
if [[ -z "$PYTHON" ]]; then
  # launch/setup.sh's venv next to the project; a container image has its own python.
  PYTHON="$(dirname "$REPO_DIR")/venv/bin/python"
  if [[ ! -x "$PYTHON" ]]; then PYTHON=python3; fi
fi
cd "$REPO_DIR"
log="$LOG_DIR/$(hostname).log"

# The compilation cache lives with the run: a restart after preemption skips recompiling.
train=(env "LIBTPU_INIT_ARGS=$LIBTPU_ARGS" "JAX_COMPILATION_CACHE_DIR=$WORKDIR/jax_cache"
       "$PYTHON" -m mobilemoe_jax.train "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
upload=(gcloud storage cp "$log" "$WORKDIR/logs/$(hostname).log")
if ((DRY_RUN)); then
  run "${train[@]}"
  run "${upload[@]}"
  exit 0
fi

mkdir -p "$LOG_DIR"
echo "+ $(quote "${train[@]}")" >>"$log"
# Output to the log file and to stdout (which GKE keeps; launch/run.sh discards it).
exec 3> >(tee -a "$log")
tee_pid=$!
"${train[@]}" >&3 2>&1 &
trainer=$!
echo "$trainer" >"$LOG_DIR/trainer.pid"  # launch/stop.sh signals this process
stopping=0
trap 'stopping=1; kill -TERM "$trainer" 2>/dev/null || true' TERM INT
status=0
wait "$trainer" || status=$?
# A trapped signal ends `wait` early (status 143); wait again for the trainer's own exit.
if ((stopping)); then
  status=0
  wait "$trainer" || status=$?
fi
rm -f "$LOG_DIR/trainer.pid"
exec 3>&-  # tee sees the end of the output; let it finish before the log is appended to
wait "$tee_pid" 2>/dev/null || true
echo "trainer exited with status $status" >>"$log"
if command -v gcloud >/dev/null && [[ "$WORKDIR" == gs://* ]]; then "${upload[@]}" || true; fi
exit "$status"
