#!/usr/bin/env bash
# Starts a training stage on every worker of a slice (in the background: closing the
# terminal does not stop it). The run's files go to gs://BUCKET/RUN (launch/README.md);
# running the same command again resumes from the latest checkpoint there.
#
#   launch/run.sh --name=NAME --zone=ZONE --bucket=gs://BUCKET --run=RUN
#                 --config=configs/stages/pretrain.py:mobilemoe_s [--project=P]
#                 [--libtpu_args='...'] [--dry_run] [-- --config.train.steps=1000 ...]
#
# Then: launch/logs.sh to follow it, launch/stop.sh to stop it (it checkpoints first).

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

BUCKET="" RUN="" CONFIG="" LIBTPU_ARGS=""
while (($#)); do
  common_flag "$1" || case "$1" in
    --bucket=*) BUCKET="${1#*=}" ;;
    --run=*) RUN="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --libtpu_args=*) LIBTPU_ARGS="${1#*=}" ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
require "$NAME" --name "the TPU VM name"
require "$ZONE" --zone "e.g. us-east5-b"
require "$BUCKET" --bucket "gs://BUCKET for checkpoints, TensorBoard and logs"
require "$RUN" --run "the run's name: its directory in the bucket"
require "$CONFIG" --config "a stage config, e.g. configs/stages/pretrain.py:mobilemoe_s"
[[ "$BUCKET" == gs://* ]] || BUCKET="gs://$BUCKET"

worker=(launch/worker.sh "--workdir=${BUCKET%/}/$RUN" "--config=$CONFIG")
if [[ -n "$LIBTPU_ARGS" ]]; then worker+=("--libtpu_args=$LIBTPU_ARGS"); fi
if ((${#EXTRA[@]})); then worker+=(-- "${EXTRA[@]}"); fi
# setsid + nohup + no open descriptors: ssh returns at once and the run outlives it.
tpu_ssh all "cd $REMOTE_DIR && setsid nohup $(quote "${worker[@]}") >/dev/null 2>&1 </dev/null &"
