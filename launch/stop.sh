#!/usr/bin/env bash
# Stops a running stage cleanly: SIGTERM to the trainer on every worker, which saves a
# checkpoint and exits (the same path as a preemption); returns once all have exited.
# Run launch/run.sh again to resume.
#
#   launch/stop.sh --name=NAME --zone=ZONE [--project=P] [--dry_run]

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

while (($#)); do
  common_flag "$1" || die "unknown argument: $1"
  shift
done
require "$NAME" --name "the TPU VM name"
require "$ZONE" --zone "e.g. us-east5-b"

pidfile="$REMOTE_DIR/logs/trainer.pid"
tpu_ssh all "pid=\$(cat $pidfile 2>/dev/null) || exit 0; kill -TERM \$pid; while kill -0 \$pid 2>/dev/null; do sleep 5; done"
