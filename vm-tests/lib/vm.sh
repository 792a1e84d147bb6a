#!/bin/bash
# Starting, watching and driving QEMU guests. Sourced after common.sh.
# Waits are on events (lines on the serial console, ssh answering), never fixed sleeps.

VM_PID=""      # of the QEMU process; also in $VM_PIDFILE, for a restart made in a subshell
VM_PIDFILE=""
VM_LOG=""
VM_SSH_PORT=""
VM_OFFSET=0
VM_ARGS=()
# Seconds without console output, inside the kernel's own start-up, that count as a stall.
VM_STALL_SECONDS=${VM_STALL_SECONDS:-150}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# vm_start NAME DISK... : boots a guest from the first disk (BIOS, GRUB) in the background. A
# DISK written FILE:ro is attached read-only.
vm_start() {
  local name=$1
  VM_ARGS=("$@")
  shift
  VM_LOG=$WORK_DIR/$name.serial.log
  : > "$VM_LOG"
  VM_OFFSET=0
  VM_PIDFILE=$WORK_DIR/$name.pid
  # A restart (vm_restart_stalled) keeps the port: it may run in a subshell of the caller.
  [ "${VM_RESTARTING:-}" = 1 ] || VM_SSH_PORT=$(free_port)
  local drives=()
  for d in "$@"; do
    case "$d" in
      *:ro) drives+=(-drive "file=${d%:ro},format=raw,if=virtio,readonly=on") ;;
      *) drives+=(-drive "file=$d,format=raw,if=virtio") ;;
    esac
  done
  qemu-system-x86_64 -accel tcg -m "${VM_MEMORY_MIB:-2048}" -smp 2 -display none -no-user-config -nodefaults \
    -serial "file:$VM_LOG" -device virtio-rng-pci \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$VM_SSH_PORT-:22" -device virtio-net-pci,netdev=n0 \
    "${drives[@]}" >"$WORK_DIR/$name.qemu.log" 2>&1 &
  VM_PID=$!
  echo "$VM_PID" >"$VM_PIDFILE"
  log "started $name (pid $VM_PID, ssh port $VM_SSH_PORT, console $VM_LOG)"
}

vm_pid() { [ -n "$VM_PIDFILE" ] && [ -f "$VM_PIDFILE" ] && cat "$VM_PIDFILE"; }

vm_alive() {
  VM_PID=$(vm_pid) || return 1
  kill -0 "$VM_PID" 2>/dev/null
}

# vm_mark: later waits only look at console output from now on.
vm_mark() { VM_OFFSET=$(stat -c %s "$VM_LOG"); }

# vm_wait REGEX TIMEOUT : waits for a console line matching REGEX (after the mark); prints it
# (without its carriage return) and moves the mark past it. Offsets are bytes of the log as it
# is: computed on a copy without carriage returns, the mark fell short of the line and the next
# wait found the same line again.
vm_wait() {
  local re=$1 timeout=$2 deadline=$((SECONDS + $2)) hit line size last_size="" quiet_since=$SECONDS
  local restarts=0
  while [ "$SECONDS" -lt "$deadline" ]; do
    hit=$(tail -c +"$((VM_OFFSET + 1))" "$VM_LOG" | LC_ALL=C grep -a -b -m1 -E "$re" || true)
    if [ -n "$hit" ]; then
      line=${hit#*:}
      VM_OFFSET=$((VM_OFFSET + ${hit%%:*} + $(printf '%s\n' "$line" | LC_ALL=C wc -c)))
      printf '%s\n' "$line" | tr -d '\r'
      return 0
    fi
    vm_alive || { log "guest died while waiting for /$re/"; return 1; }
    size=$(stat -c %s "$VM_LOG")
    if [ "$size" != "$last_size" ]; then
      last_size=$size quiet_since=$SECONDS
    elif [ $((SECONDS - quiet_since)) -ge "$VM_STALL_SECONDS" ] && vm_kernel_stalled; then
      [ "$restarts" -lt 2 ] || { log "the guest kernel stalled again; giving up"; break; }
      restarts=$((restarts + 1))
      vm_restart_stalled || return 1
      last_size="" quiet_since=$SECONDS
    fi
    sleep 0.5
  done
  log "timed out after ${timeout}s waiting for /$re/ on the console; last lines:"
  tail -n 25 "$VM_LOG" | tr -d '\r' >&2
  return 1
}

# vm_kernel_stalled : true when the console's last boot printed the kernel's banner but never
# reached "Run /init": the guest stopped inside the kernel's own start-up, before any code of
# ours (initramfs scripts, units) ran. Seen once in a cold CI run (TCG, right after
# "Switched to clocksource hpet", silent for 15 minutes); GRUB and initramfs hangs, which are
# ours to catch, are never taken for one.
vm_kernel_stalled() {
  LC_ALL=C awk '/Linux version/ { k = 1; r = 0 } /Run \/init as init process/ { r = 1 }
    END { exit !(k && !r) }' "$VM_LOG"
}

# vm_restart_stalled : power-cycles a guest whose kernel stalled (see vm_kernel_stalled), keeping
# the stalled console next to the new one; the box must survive this cut like any other.
vm_restart_stalled() {
  local keep=$VM_LOG.stalled-$SECONDS
  log "the guest kernel stalled before running /init (a TCG hang, not a box fault); power-cycling it, console kept in $keep"
  tail -n 5 "$VM_LOG" | tr -d '\r' >&2
  vm_kill
  cp "$VM_LOG" "$keep"
  VM_RESTARTING=1 vm_start "${VM_ARGS[@]}"
}

# vm_wait_boot [TIMEOUT] : waits for the boot marker; prints the booted version.
vm_wait_boot() {
  local line
  line=$(vm_wait 'UPGRADECTL-TEST booted version=' "${1:-600}") || return 1
  sed -E 's/.*version=([^ ]+).*/\1/' <<<"$line"
}

vm_ssh() {
  ssh -q -i "$SSH_KEY" -p "$VM_SSH_PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o ConnectTimeout=20 -o ServerAliveInterval=10 -o BatchMode=yes root@127.0.0.1 "$@"
}

# vm_run CMD : runs a shell command line in the guest, echoing it; fails with its exit code.
vm_run() {
  log "guest\$ $*"
  vm_ssh "$*"
}

vm_copy_in() {
  scp -q -i "$SSH_KEY" -P "$VM_SSH_PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    "$1" "root@127.0.0.1:$2"
}

# vm_reboot : asks the guest to reboot and returns once the command was sent.
vm_reboot() {
  vm_mark
  vm_ssh 'systemctl reboot' || true
}

# vm_kill : a hard power cut.
vm_kill() {
  if vm_alive; then
    kill -9 "$VM_PID" 2>/dev/null || true
    wait "$VM_PID" 2>/dev/null || true
    # Not our child when it was restarted in a subshell: wait for it to go.
    while kill -0 "$VM_PID" 2>/dev/null; do sleep 0.1; done
  fi
  VM_PID=""
  [ -z "$VM_PIDFILE" ] || rm -f "$VM_PIDFILE"
}

vm_poweroff() {
  if vm_alive; then
    vm_ssh 'systemctl poweroff 2>/dev/null' || true
    local deadline=$((SECONDS + 120))
    while vm_alive && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
  fi
  vm_kill
}
