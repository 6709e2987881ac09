#!/usr/bin/env bash
# Runs a training stage on a GKE TPU slice node pool as a JobSet (launch/jobset.yaml):
#
#   launch/gke.sh apply  --name=NAME --image=IMAGE --bucket=gs://BUCKET --run=RUN
#                        --config=configs/stages/pretrain.py:mobilemoe_s
#                        --type=v5litepod-16 --topology=4x4 [--chips_per_worker=4]
#                        [--max_restarts=10] [--service_account=default] [--dry_run]
#                        [-- --config.train.steps=1000 ...]
#   launch/gke.sh logs   --name=NAME [--dry_run]    # follows worker 0
#   launch/gke.sh delete --name=NAME [--dry_run]    # SIGTERM: the trainer saves, then exits
#
# kubectl uses its current context (gcloud container clusters get-credentials ...). The
# image holds the project at /app (launch/Dockerfile). --dry_run prints the manifest too.

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

ACTION="" IMAGE="" BUCKET="" RUN="" CONFIG="" TYPE="" TOPOLOGY="" CHIPS_PER_WORKER=4 MAX_RESTARTS=10
SERVICE_ACCOUNT=default
while (($#)); do
  common_flag "$1" || case "$1" in
    apply | logs | delete) ACTION="$1" ;;
    --image=*) IMAGE="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --run=*) RUN="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --topology=*) TOPOLOGY="${1#*=}" ;;
    --chips_per_worker=*) CHIPS_PER_WORKER="${1#*=}" ;;
    --max_restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --service_account=*) SERVICE_ACCOUNT="${1#*=}" ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
[[ -n "$ACTION" ]] || die "say what to do: apply, logs or delete"
require "$NAME" --name "the JobSet name"

if [[ "$ACTION" == logs ]]; then
  run kubectl logs -f --tail=100 \
    "--selector=jobset.sigs.k8s.io/jobset-name=$NAME,batch.kubernetes.io/job-completion-index=0"
  exit 0
fi
if [[ "$ACTION" == delete ]]; then
  run kubectl delete jobset "$NAME"
  exit 0
fi

require "$IMAGE" --image "a container image with the project at /app"
require "$BUCKET" --bucket "gs://BUCKET for checkpoints, TensorBoard and logs"
require "$RUN" --run "the run's name: its directory in the bucket"
require "$CONFIG" --config "a stage config, e.g. configs/stages/pretrain.py:mobilemoe_s"
require "$TYPE" --type "the slice's accelerator type, e.g. v5litepod-16"
require "$TOPOLOGY" --topology "the slice's chip topology, e.g. 4x4"
[[ "$BUCKET" == gs://* ]] || BUCKET="gs://$BUCKET"

# The node label GKE gives each TPU generation.
case "$TYPE" in
  v6e-*) accelerator=tpu-v6e-slice ;;
  v5litepod-* | v5e-*) accelerator=tpu-v5-lite-podslice ;;
  v5p-*) accelerator=tpu-v5p-slice ;;
  v4-*) accelerator=tpu-v4-podslice ;;
  *) die "unknown --type=$TYPE (v6e-N, v5litepod-N, v5p-N or v4-N)" ;;
esac
chips=1
IFS=x read -ra dims <<<"$TOPOLOGY"
for d in "${dims[@]}"; do
  [[ "$d" =~ ^[0-9]+$ ]] || die "--topology=$TOPOLOGY is not like 4x4 or 2x2x4"
  chips=$((chips * d))
done
((chips % CHIPS_PER_WORKER == 0)) || die "--topology=$TOPOLOGY ($chips chips) does not split into hosts of $CHIPS_PER_WORKER chips"
workers=$((chips / CHIPS_PER_WORKER))

# The container command as a YAML flow list of JSON strings.
command=(launch/worker.sh "--workdir=${BUCKET%/}/$RUN" "--config=$CONFIG")
if ((${#EXTRA[@]})); then command+=(-- "${EXTRA[@]}"); fi
yaml_command=""
bs="\\" dq='"'
for w in "${command[@]}"; do
  w=${w//"$bs"/"$bs$bs"}
  w=${w//"$dq"/"$bs$dq"}
  yaml_command+="${yaml_command:+, }\"$w\""
done

manifest="$(<"$LAUNCH_DIR/jobset.yaml")"
for pair in "NAME=$NAME" "IMAGE=$IMAGE" "MAX_RESTARTS=$MAX_RESTARTS" "WORKERS=$workers" \
            "SERVICE_ACCOUNT=$SERVICE_ACCOUNT" "ACCELERATOR=$accelerator" "TOPOLOGY=$TOPOLOGY" \
            "CHIPS_PER_WORKER=$CHIPS_PER_WORKER" "COMMAND=[$yaml_command]"; do
  # Quoted pattern and value: taken literally (no globbing, no `&` or `\` processing).
  placeholder="\${${pair%%=*}}" value="${pair#*=}"
  manifest=${manifest//"$placeholder"/"$value"}
done
if [[ "$manifest" == *"\${"* ]]; then die "jobset.yaml has a placeholder gke.sh does not fill"; fi

if ((DRY_RUN)); then
  echo "$manifest"
  run kubectl apply -f -
else
  echo "$manifest" | run kubectl apply -f -
fi
