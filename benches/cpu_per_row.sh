#!/usr/bin/env bash
# CPU per replicated row during a backlog drain, per process, without a cargo bench build
# (benches/cpu_per_row.rs measures the same through walbridge::localpg).
#
#   benches/cpu_per_row.sh {native|pgoutput|wal2json} [ROWS=100000]
#
# Env: WALBRIDGE_BIN (default target/release/walbridge), PGBIN (default the PostgreSQL 15
# binaries; /opt/walbridge-pg/17/bin for 17), WRAP (a command walbridge run starts under, e.g.
# "strace -c -f -o /tmp/sc" or "perf record -e cpu-clock -g -o /tmp/p.data --"), WALSENDER_PERF
# (a file: perf record A's walsender into it for the drain).
# Two throwaway clusters (fsync off) run as postgres; ROWS single-row INSERT transactions are
# queued on A while nothing replicates; then replication starts and the drain ends when the
# last row is on B. CPU = utime+stime from /proc/<pid>/stat at the end of the drain, of
# walbridge, A's walsender and B's applying backend(s); the walsenders start with the drain.
set -euo pipefail
what=${1:?native, pgoutput or wal2json}
rows=${2:-100000}
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${WALBRIDGE_BIN:-$here/target/release/walbridge}
pgbin=${PGBIN:-/usr/lib/postgresql/15/bin}
clients=$(dirname "$(command -v psql)")
dir=$(mktemp -d /tmp/walbridge-cpu-XXXXXX)
chown postgres "$dir"
hz=$(getconf CLK_TCK)
as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
  [ -n "${wb:-}" ] && kill "$wb" 2>/dev/null && wait "$wb" 2>/dev/null
  for n in a b; do as_pg "$pgbin/pg_ctl" -D "$dir/$n" -m immediate stop >/dev/null 2>&1 || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pa=$(port); pb=$(port)
for n in a b; do
  p=$pa; [ $n = b ] && p=$pb
  as_pg "$pgbin/initdb" -D "$dir/$n" -U postgres -A trust >/dev/null
  cat >> "$dir/$n/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $p
unix_socket_directories = '$dir'
wal_level = logical
track_commit_timestamp = on
max_replication_slots = 32
max_wal_senders = 32
fsync = off
full_page_writes = off
max_wal_size = 4GB
checkpoint_timeout = 30min
CONF
  # Captured first: `grep -q` closing the pipe early would fail it under pipefail.
  settings=$(as_pg "$pgbin/postgres" --describe-config 2>/dev/null || true)
  if grep -q '^output_plugin_libraries' <<<"$settings"; then
    echo "output_plugin_libraries = 'pgoutput, test_decoding, wal2json'" >> "$dir/$n/postgresql.conf"
  fi
  as_pg "$pgbin/pg_ctl" -D "$dir/$n" -l "$dir/$n.log" -w start >/dev/null
done
q() { "$clients/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"; }
for p in $pa $pb; do
  q $p "CREATE TABLE public.bench (id bigint PRIMARY KEY, payload text NOT NULL, n int NOT NULL); CREATE SEQUENCE public.bench_seq;"
done
if [ "$what" = native ]; then
  q $pa "CREATE PUBLICATION bench_pub FOR TABLE public.bench"
  q $pb "CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port=$pa user=postgres dbname=postgres' PUBLICATION bench_pub WITH (copy_data = false, enabled = false)"
  slot=bench_sub
  apply="SELECT pid FROM pg_stat_activity WHERE backend_type LIKE 'logical replication%worker'"
else
  cat > "$dir/cpu.toml" <<TOML
[[nodes]]
name = "a"
dsn = "host=127.0.0.1 port=$pa user=postgres dbname=postgres sslmode=disable"
[[nodes]]
name = "b"
dsn = "host=127.0.0.1 port=$pb user=postgres dbname=postgres sslmode=disable"
[replication]
tables = ["public.bench"]
plugin = "$what"
[metrics]
listen = ""
TOML
  "$bin" setup --config "$dir/cpu.toml" >/dev/null
  slot=walbridge_a_to_b
  apply="SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'walbridge-apply-a-to-b%'"
fi
echo "INSERT INTO bench VALUES (nextval('bench_seq'), 'payload-0123456789-abcdefghij', 1);" > "$dir/insert.sql"
if [ "$rows" -ge 4 ]; then
  "$clients/pgbench" -n -h 127.0.0.1 -p $pa -U postgres -c 4 -j 2 -t $((rows / 4)) -f "$dir/insert.sql" postgres >/dev/null
fi
q $pa "INSERT INTO bench VALUES (-1, 'marker', 0)"
total=$(q $pa "SELECT count(*) FROM bench")
cpu() { local s=0 p; for p in "$@"; do
  [ -r /proc/$p/stat ] && s=$(( s + $(sed 's/.*) //' /proc/$p/stat | awk '{print $12 + $13}') )); done; echo $s; }
start=$(date +%s.%N)
if [ "$what" = native ]; then
  q $pb "ALTER SUBSCRIPTION bench_sub ENABLE"
else
  RUST_LOG=warn ${WRAP:-} "$bin" run --config "$dir/cpu.toml" >/dev/null &
  wb=$!
fi
declare -A seen=()
ta=0; tb=0; tback=0
while :; do
  for p in $(q $pa "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '$slot'"); do
    if [ -n "${WALSENDER_PERF:-}" ] && [ -z "${seen[a$p]:-}" ]; then
      perf record -q -F 1000 -e cpu-clock -p "$p" -o "$WALSENDER_PERF" >/dev/null 2>&1 &
    fi
    seen[a$p]=$p
  done
  for p in $(q $pb "$apply"); do seen[b$p]=$p; done
  for p in $(q $pb "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'walbridge_b_to_a'"); do seen[r$p]=$p; done
  la=(); lb=(); lr=()
  for k in "${!seen[@]}"; do case $k in a*) la+=("${seen[$k]}");; b*) lb+=("${seen[$k]}");; r*) lr+=("${seen[$k]}");; esac; done
  x=$(cpu "${la[@]}"); [ "$x" -gt "$ta" ] && ta=$x
  x=$(cpu "${lb[@]}"); [ "$x" -gt "$tb" ] && tb=$x
  x=$(cpu "${lr[@]}"); [ "$x" -gt "$tback" ] && tback=$x
  [ "$(q $pb "SELECT EXISTS (SELECT 1 FROM bench WHERE id = -1)")" = t ] && break
  sleep 0.05
done
end=$(date +%s.%N)
own=0
[ -n "${wb:-}" ] && own=$(cpu "$wb")
got=$(q $pb "SELECT count(*) FROM bench")
[ "$got" = "$total" ] || { echo "B has $got rows, A has $total" >&2; exit 1; }
python3 - "$what" "$total" "$start" "$end" "$own" "$ta" "$tb" "$tback" "$hz" <<'PY'
import sys
what, n, s, e, own, ta, tb, tr, hz = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:])
us = lambda t: t / hz * 1e6 / n
print(f"| {what} | {n} | {n/(e-s):.0f} | {us(own):.1f} | {us(ta):.1f} | {us(tb):.1f} | {us(tr):.1f} |")
PY
