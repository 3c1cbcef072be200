#!/usr/bin/env bash
# `make run`: one container in a kata-rs VM, end to end, the way a user runs it:
# a private containerd 1.6 (config, root, state and socket under
# target/run/containerd/, its PATH starting with the kata-rs binaries so that
# `--runtime io.containerd.kata.v2` finds containerd-shim-kata-v2), a kata-rs
# configuration naming the guest image of `make image` (target/run/configuration.toml,
# passed as KATA_CONF_FILE), the busybox image built locally by
# `kata-ctl oci-image` and imported with `ctr image import`, then
#   ctr run --rm --runtime io.containerd.kata.v2 docker.io/library/busybox:latest ... uname -a
# whose output (the guest's kernel) is printed next to the host's `uname -r`.
#
# On exit, whatever happened, the script stops the containerd it started (by
# its PID), ends the shims that containerd started (found by its socket), and
# unmounts and removes containerd's root and state. containerd.log and the
# generated configurations stay in target/run/ for inspection.
#
# Environment: KATA_BIN_DIR (default target/x86_64-unknown-linux-gnu/release),
# KATA_GUEST_DIR (default target/guest), KATA_RUN_ACCELERATOR (default auto),
# KATA_RUN_DEBUG=1 (containerd and the shim log at debug level),
# KATA_RUN_TIMEOUT (seconds for `ctr run`, default 300).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${KATA_BIN_DIR:-$ROOT/target/x86_64-unknown-linux-gnu/release}
GUEST=${KATA_GUEST_DIR:-$ROOT/target/guest}
ACCEL=${KATA_RUN_ACCELERATOR:-auto}
TIMEOUT=${KATA_RUN_TIMEOUT:-300}
RUN=$ROOT/target/run
CD=$RUN/containerd
NS=kata-rs
IMAGE=docker.io/library/busybox:latest
ID=kata-rs-demo-$$
LOG=$CD/containerd.log
PIDFILE=$CD/containerd.pid
KATA_CONF=$RUN/configuration.toml

say() { echo "run: $*" >&2; }
die() { say "error: $*"; exit 1; }

# --- prerequisites --------------------------------------------------------
[ "$(id -u)" = 0 ] || die "needs root (containerd, mounts, the VM's jail): run \`sudo make run\`"
for t in containerd ctr; do
  command -v "$t" >/dev/null || die "$t is not installed: \`make deps\` installs Debian's containerd package"
done
for b in kata-ctl containerd-shim-kata-v2 kata-vmm-launcher kata-virtiofsd; do
  [ -x "$BIN/$b" ] || die "$BIN/$b is missing: run \`make build\`"
done
for f in vmlinuz initrd.img; do
  [ -f "$GUEST/$f" ] || die "$GUEST/$f is missing: run \`make image\`"
done

# unix socket paths have at most 107 bytes: a deep checkout gets its socket in /run
SOCK=$CD/c.sock
if [ "${#SOCK}" -gt 100 ]; then
  SOCK=/run/kata-rs-run-$$/c.sock
fi

# --- clean-up: runs on every exit ----------------------------------------
containerd_pid=""

# The PIDs of the shims started by the containerd at socket $1 (their
# -address is that socket, which no other containerd has), except PID $2.
own_shims() {
  local p args
  for p in /proc/[0-9]*; do
    args=$(tr '\0' '\n' 2>/dev/null <"$p/cmdline") || continue
    if grep -qxF -- "-address" <<<"$args" && grep -qxF -- "$1" <<<"$args"; then
      [ "${p#/proc/}" = "$2" ] || echo "${p#/proc/}"
    fi
  done
}

# Mount points under $1, deepest first (mountinfo field 5).
mounts_under() {
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
    awk '{ print gsub("/", "/"), $0 }' | sort -rn | cut -d' ' -f2- | uniq
}

is_zombie() { [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ]; }

# SIGTERM, 10 s, SIGKILL. A child of this script is reaped by `wait`; a
# leftover of an earlier run is not ours to wait for (its zombie counts as gone).
stop_containerd() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do
    kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid" || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid"; then
    say "containerd $pid ignored SIGTERM for 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# Everything of the containerd with PID $1 (may be empty) and socket $2:
# its tasks and containers (through ctr, so the shims clean up their pods),
# the containerd, shims of it still running, mounts under its directories,
# its root and state.
teardown() {
  local pid=$1 sock=$2 ns t c p m d
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid"; then
    # what `ctr run --rm` did not get to delete (interrupted, or the shim failed)
    for ns in $(timeout 10 ctr -a "$sock" namespaces ls -q 2>/dev/null); do
      for t in $(timeout 10 ctr -a "$sock" -n "$ns" tasks ls -q 2>/dev/null); do
        say "deleting leftover task $ns/$t"
        timeout 30 ctr -a "$sock" -n "$ns" tasks kill -a -s SIGKILL "$t" >/dev/null 2>&1
        timeout 60 ctr -a "$sock" -n "$ns" tasks delete -f "$t" >/dev/null 2>&1
      done
      for c in $(timeout 10 ctr -a "$sock" -n "$ns" containers ls -q 2>/dev/null); do
        timeout 30 ctr -a "$sock" -n "$ns" containers delete "$c" >/dev/null 2>&1
      done
    done
    stop_containerd "$pid"
  fi
  for p in $(own_shims "$sock" "$pid"); do
    say "shim $p of containerd $pid still runs: SIGKILL"
    kill -KILL "$p" 2>/dev/null
  done
  for d in "$CD" "$(dirname "$sock")"; do
    for m in $(mounts_under "$d"); do
      umount -l "$m" || say "cannot unmount $m"
    done
  done
  if [ -n "$(mounts_under "$CD")" ]; then
    say "still mounted under $CD, not removing it:"
    mounts_under "$CD" >&2
  else
    rm -rf "$CD/root" "$CD/state"
  fi
  rm -f "$sock" "$sock.ttrpc" "$PIDFILE"
  [ "$(dirname "$sock")" = "$CD" ] || rmdir "$(dirname "$sock")" 2>/dev/null || true
  return 0
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  teardown "$containerd_pid" "$SOCK"
  [ "$rc" = 0 ] || say "failed (exit $rc); containerd's log: $LOG"
  exit "$rc"
}

# A containerd left by an earlier run that was killed before its clean-up
# (PIDFILE holds "PID SOCKET"): tear it down, if that PID still is that
# containerd; then whatever that run left mounted or on disk.
if [ -f "$PIDFILE" ]; then
  read -r old old_sock <"$PIDFILE" || true
  if [ -n "${old:-}" ] && tr '\0' ' ' 2>/dev/null <"/proc/$old/cmdline" | grep -qF -- "--config $CD/config.toml"; then
    say "tearing down containerd $old, left by an earlier run"
  else
    old=""
  fi
  (set +e; teardown "$old" "${old_sock:-$SOCK}")
fi
(set +e; teardown "" "$SOCK")

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the kata-rs configuration ---------------------------------------------
mkdir -p "$CD" "$(dirname "$SOCK")"
debug=false
[ "${KATA_RUN_DEBUG:-0}" = 1 ] && debug=true
cat >"$KATA_CONF" <<EOF
# generated by scripts/run.sh (make run)
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
kernel = "$GUEST/vmlinuz"
initrd = "$GUEST/initrd.img"
accelerator = "$ACCEL"
default_memory = 512
virtio_fs_daemon = "$BIN/kata-virtiofsd"
launcher = "$BIN/kata-vmm-launcher"
enable_debug = $debug

[agent.kata]
enable_debug = $debug

[runtime]
enable_debug = $debug
EOF

# --- a private containerd ---------------------------------------------------
level=info
[ "$debug" = true ] && level=debug
cat >"$CD/config.toml" <<EOF
# generated by scripts/run.sh (make run): a private containerd
version = 2
root = "$CD/root"
state = "$CD/state"
# CRI is not needed by ctr; the other snapshotters cannot work here; opt would
# create /opt/containerd. (io.containerd.runtime.v1.linux must stay: the tasks
# service does not load without it.)
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[debug]
  level = "$level"

[metrics]
  address = ""
EOF

say "starting containerd (config $CD/config.toml, log $LOG)"
PATH="$BIN:$PATH" KATA_CONF_FILE="$KATA_CONF" \
  containerd --config "$CD/config.toml" </dev/null >"$LOG" 2>&1 &
containerd_pid=$!
echo "$containerd_pid $SOCK" >"$PIDFILE"
for i in $(seq 200); do
  kill -0 "$containerd_pid" 2>/dev/null || { tail -n 30 "$LOG" >&2; die "containerd exited at start"; }
  [ -S "$SOCK" ] && ctr -a "$SOCK" version >/dev/null 2>&1 && break
  [ "$i" = 200 ] && { tail -n 30 "$LOG" >&2; die "containerd did not answer within 20 s"; }
  sleep 0.1
done

CTR=(ctr -a "$SOCK" -n "$NS")

say "building the busybox image ($IMAGE)"
"$BIN/kata-ctl" oci-image --output "$RUN/busybox.tar" --name "$IMAGE"
"${CTR[@]}" image import "$RUN/busybox.tar" >&2

say "ctr run --rm --runtime io.containerd.kata.v2 $IMAGE $ID uname -a"
start=$(date +%s%N)
set +e
guest=$(timeout "$TIMEOUT" "${CTR[@]}" run --rm --runtime io.containerd.kata.v2 "$IMAGE" "$ID" uname -a 2>"$RUN/ctr.err")
status=$?
set -e
ms=$((($(date +%s%N) - start) / 1000000))
if [ "$status" != 0 ] || [ -z "$guest" ]; then
  say "ctr run failed (exit $status)${guest:+, output: $guest}"
  [ "$status" = 124 ] && say "ctr run did not finish within $TIMEOUT s (KATA_RUN_TIMEOUT)"
  echo "--- ctr's stderr:" >&2
  cat "$RUN/ctr.err" >&2
  echo "--- containerd's log (with the shim's), last 40 lines but plugin loading:" >&2
  grep -v 'loading plugin' "$LOG" | tail -n 40 >&2
  exit 1
fi
echo "guest (kata-rs VM): $guest"
echo "host kernel:        $(uname -r)"
say "ctr run took $((ms / 1000)).$(printf %03d $((ms % 1000))) s"
