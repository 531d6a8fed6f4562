#!/usr/bin/env bash
# The benchmark matrix of the original study, unattended: every stack variant in $STACKS,
# $ROUNDS rounds each, through `emnist bench run`, then the report (tables + PNG plots).
# Safe under `nohup ./test.sh &`: no tty, never reads stdin, everything appends to $OUTPUT.
#
#   STACKS    glob of stack variants        (tests/stacks/emnist*.yml)
#   ROUNDS    timed rounds per variant      (3)
#   WARMUP    untimed runs per variant      (0)
#   RESULTS   JSON-lines results file       (results/bench-suite.jsonl)
#   OUTPUT    log file                      (output.txt)
#   TIMEOUT   seconds per run               (1800)
#   EMNIST    the emnist command            (.venv/bin/emnist, else emnist on PATH)
#   BENCH_ARGS  extra `emnist bench run` options, e.g. "--target-accuracy 0.8"
#   OPENFAAS_URL, STORE_URL, ... as for emnist; a local gateway is started (and stopped
#   afterwards) when none answers on 127.0.0.1.
set -uo pipefail
cd "$(dirname "$0")"
STACKS=${STACKS:-tests/stacks/emnist*.yml}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-0}
RESULTS=${RESULTS:-results/bench-suite.jsonl}
OUTPUT=${OUTPUT:-output.txt}
TIMEOUT=${TIMEOUT:-1800}
EMNIST=${EMNIST:-}
[ -n "$EMNIST" ] || { [ -x .venv/bin/emnist ] && EMNIST=.venv/bin/emnist || EMNIST=emnist; }
exec </dev/null >>"$OUTPUT" 2>&1
trap '' HUP

# shellcheck disable=SC2206  # the glob is meant to expand
stacks=($STACKS)
echo "=== $(date -Is) test.sh: ${#stacks[@]} variants x $ROUNDS rounds -> $RESULTS"
if [ ! -e "${stacks[0]}" ]; then
  echo "no stack files match STACKS=$STACKS"; exit 2
fi
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
"$EMNIST" bench run "${stacks[@]}" --rounds "$ROUNDS" --warmup "$WARMUP" \
  --results "$RESULTS" --timeout "$TIMEOUT" --down ${BENCH_ARGS:-}
status=$?
"$EMNIST" bench report --results "$RESULTS" || { [ "$status" = 0 ] && status=1; }
echo "=== $(date -Is) test.sh: done (exit $status)"
exit $status
