#!/usr/bin/env bash
# `make run`: the API on http://127.0.0.1:8000 and one worker, in the foreground; Ctrl-C stops both.
set -euo pipefail
ferry=.venv/bin/ferry

key=$("$ferry" keys create "local $(date +%Y-%m-%dT%H:%M:%S)" | tail -n 1)

pids=()
stop() {
    trap - INT TERM EXIT
    [ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null || true
    wait || true
}
trap stop INT TERM EXIT

"$ferry" worker &
pids+=($!)
"$ferry" api --host 127.0.0.1 --port 8000 &
pids+=($!)

cat <<TXT

  Ferry is starting: API on http://127.0.0.1:8000/v1, one worker serving SmolLM2-135M-Instruct
  (the worker takes about a minute to load its engine; /readyz says when it is up).
  API key for local use:

    export OPENAI_BASE_URL=http://127.0.0.1:8000/v1
    export OPENAI_API_KEY=$key

  Ctrl-C stops both.

TXT
wait -n "${pids[@]}"
