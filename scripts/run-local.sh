#!/usr/bin/env bash
# `make run`: the API on http://127.0.0.1:8000 and one worker, in the foreground; Ctrl-C stops both.
# A worker that exits is started again after a pause that doubles with each quick exit (up to a
# minute), while the API keeps serving; one whose settings are refused, or whose engine fails its
# self-check, is not (the same settings would fail again): the script then stops, with its code.
set -uo pipefail
ferry=.venv/bin/ferry
port=${FERRY_PORT:-8000}
# Worker exit codes (workers/self_check.py).
EXIT_BAD_SETTINGS=2
EXIT_ENGINE_DEAD=3
EXIT_SELF_CHECK_FAILED=4
# A worker that ran this long before exiting restarts at once.
STEADY_SECONDS=300
MAX_DELAY=60

# Webhook secrets are sealed with FERRY_SECRET_KEY: unless the environment or .env sets one, a
# random one is made once and kept in the cache folder.
secret_file="${FERRY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}/secret-key"
if [ -z "${FERRY_SECRET_KEY:-}" ] && ! grep -qs '^FERRY_SECRET_KEY=.' .env; then
    if [ ! -s "$secret_file" ]; then
        mkdir -p "$(dirname "$secret_file")"
        (umask 077 && .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))' \
            >"$secret_file") || exit 1
    fi
    FERRY_SECRET_KEY=$(<"$secret_file")
    export FERRY_SECRET_KEY
    secret_line="    export FERRY_SECRET_KEY=\$(cat $secret_file)   # for \`ferry webhooks\`"
else
    secret_line=""
fi

key=$("$ferry" keys create "local $(date +%Y-%m-%dT%H:%M:%S)" | tail -n 1) || exit 1

api=""
worker=""
stop() {
    trap - INT TERM EXIT
    kill -TERM $api $worker 2>/dev/null
    wait
    exit "${1:-0}"
}
trap 'stop 130' INT
trap 'stop 143' TERM
trap 'stop $?' EXIT

why() {
    case $1 in
        0) echo "it stopped" ;;
        "$EXIT_BAD_SETTINGS") echo "its settings were refused, code $1" ;;
        "$EXIT_ENGINE_DEAD") echo "its engine died, code $1" ;;
        "$EXIT_SELF_CHECK_FAILED") echo "its engine failed the self-check, code $1" ;;
        1[2-9][0-9]) echo "killed by SIG$(kill -l $(($1 - 128)) 2>/dev/null || echo $(($1 - 128)))" ;;
        *) echo "code $1" ;;
    esac
}

"$ferry" api --host 127.0.0.1 --port "$port" &
api=$!

cat <<TXT

  Ferry is starting: API on http://127.0.0.1:$port/v1, one worker serving SmolLM2-135M-Instruct
  (the worker takes about a minute to load its engine; /readyz says when it is up).
  API key for local use:

    export OPENAI_BASE_URL=http://127.0.0.1:$port/v1
    export OPENAI_API_KEY=$key
$secret_line

  Ctrl-C stops both.

TXT

delay=1
while true; do
    started=$SECONDS
    "$ferry" worker &
    worker=$!
    wait -n -p ended $api $worker
    code=$?
    if [ "$ended" = "$api" ]; then
        echo "ferry: the API exited ($(why $code)); stopping" >&2
        stop $code
    fi
    worker=""
    if [ $code -eq $EXIT_SELF_CHECK_FAILED ] || [ $code -eq $EXIT_BAD_SETTINGS ]; then
        echo "ferry: the worker will not serve ($(why $code)): change the setting named above," \
            "then start again; stopping" >&2
        stop $code
    fi
    if [ $((SECONDS - started)) -ge $STEADY_SECONDS ]; then
        delay=1
    fi
    echo "ferry: the worker exited ($(why $code)); starting it again in $delay s;" \
        "the API keeps serving" >&2
    sleep $delay &
    wait $!
    delay=$((delay * 2 > MAX_DELAY ? MAX_DELAY : delay * 2))
done
