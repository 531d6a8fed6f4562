#!/usr/bin/env bash
# Start (or stop) the test servers on loopback only: memcached :11211, Redis :6379,
# RabbitMQ :5672 (epmd :4369 and Erlang distribution :25672 bound to loopback too).
# Idempotent: a server already answering on its port is left alone.
set -euo pipefail
cmd=${1:-start}
state=${EMNIST_HOME:-$HOME/.cache/emnist}/servers
mkdir -p "$state"
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
user=(); [ "$(id -u)" = 0 ] && user=(-u root)
rabbit=rabbit@localhost
# RabbitMQ accepts AMQP (answers the protocol header with a Connection.Start frame), not just TCP
amqp_up() {
  timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672 && printf "AMQP\0\0\11\1" >&3 &&
    [ "$(head -c1 <&3 | od -An -tx1 | tr -d " ")" = 01 ]' 2>/dev/null
}

case $cmd in
start)
  if ! up 11211; then
    # 1 GB: the suite writes thousands of runs and (store:/) data sets; a full memcached
    # evicts within a slab class, which can take a set's first chunks while its last are written
    memcached -d -l 127.0.0.1 -p 11211 -m 1024 -P "$state/memcached.pid" "${user[@]}"
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
  if ! amqp_up; then
    # a node of our own, named rabbit@localhost so a machine's hostname never matters
    env RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=5672 RABBITMQ_NODENAME="$rabbit" \
      ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_DIST_PORT=25672 \
      RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
      rabbitmq-server -detached >"$state/rabbitmq.out" 2>&1
    touch "$state/rabbitmq.started"
    for _ in $(seq 300); do amqp_up && break; sleep 0.2; done  # it takes several seconds
    amqp_up || { echo "rabbitmq on 127.0.0.1:5672 did not start (see $state/rabbitmq.out)" >&2
                 exit 1; }
  fi
  echo "rabbitmq 127.0.0.1:5672 is up"
  ;;
stop)
  if [ -f "$state/rabbitmq.started" ]; then
    rabbitmqctl -n "$rabbit" stop >/dev/null 2>&1 || true
    rm -f "$state/rabbitmq.started"
  fi
  for f in "$state"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; rm -f "$f"; done
  ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
