#!/usr/bin/env bash
# Follows a running stage's log on one worker (default 0, the one that writes metrics), or
# on all of them. Ctrl-C stops following, not the run. Finished runs: gs://BUCKET/RUN/logs/.
#
#   launch/logs.sh --name=NAME --zone=ZONE [--project=P] [--worker=0|all] [--dry_run]

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

WORKER=0
while (($#)); do
  common_flag "$1" || case "$1" in
    --worker=*) WORKER="${1#*=}" ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
require "$NAME" --name "the TPU VM name"
require "$ZONE" --zone "e.g. us-east5-b"

# $(hostname) is expanded on the worker: each writes logs/<its hostname>.log.
tpu_ssh "$WORKER" "tail -n 100 -F $REMOTE_DIR/logs/\$(hostname).log"
