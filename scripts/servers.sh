#!/usr/bin/env bash
# Start (or stop) the test servers on loopback only: memcached :11211, Redis :6379.
# Idempotent: a server already answering on its port is left alone.
set -euo pipefail
cmd=${1:-start}
state=${EMNIST_HOME:-$HOME/.cache/emnist}/servers
mkdir -p "$state"
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
user=(); [ "$(id -u)" = 0 ] && user=(-u root)

case $cmd in
start)
  if ! up 11211; then
    memcached -d -l 127.0.0.1 -p 11211 -m 256 -P "$state/memcached.pid" "${user[@]}"
  fi
  if ! up 6379; then
    redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save "" --appendonly no \
      --pidfile "$state/redis.pid" --logfile "$state/redis.log"
  fi
  for port in 11211 6379; do
    for _ in $(seq 100); do up $port && break; sleep 0.1; done
    up $port || { echo "server on 127.0.0.1:$port did not start" >&2; exit 1; }
  done
  echo "memcached 127.0.0.1:11211 and redis 127.0.0.1:6379 are up"
  ;;
stop)
  for f in "$state"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; rm -f "$f"; done
  ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
