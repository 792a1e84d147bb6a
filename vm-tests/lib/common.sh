#!/bin/bash
# Shared settings and helpers of the VM tier. Sourced, never run.
# shellcheck disable=SC2034  # variables used by the scripts that source this file

VMT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_DIR=$(cd "$VMT_DIR/.." && pwd)
# Artefacts (ZFS module, base tree, images) are keyed by a hash of their inputs and shared by
# every clone on the machine, so a second CI run on the same machine is warm; a run's disks and
# logs (work) belong to the clone.
CACHE_DIR=${VMT_CACHE:-/var/cache/upgradectl-vm-tests}
WORK_DIR=${VMT_WORK:-$VMT_DIR/work}
SUITE=bookworm
MIRROR=${VMT_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${VMT_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# Fixed UUID of the box's host partition: GRUB searches for it, the kernel mounts it.
HOST_UUID=5c1f0a3e-7d2b-4e55-9a61-0b7e2f4c8d10
SSH_KEY=$CACHE_DIR/ssh/id_ed25519

mkdir -p "$CACHE_DIR" "$WORK_DIR"

# need_space DIR GIB WHAT : fails at once, saying so, when DIR's filesystem has less than GIB
# GiB free, instead of an hour later on "No space left on device" somewhere in a scenario.
need_space() {
  local free
  free=$(df --output=avail -B1G "$1" | tail -n1)
  [ "$free" -ge "$2" ] || die "$3 needs $2 GiB free on the filesystem of $1, which has $free GiB"
}

log() { printf '[vm-tests %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# The sources every guest and build chroot uses: main + contrib (ZFS), with security updates so
# that the kernel and its headers always match.
write_sources() {
  cat > "$1" <<SRC
deb $MIRROR $SUITE main contrib
deb $MIRROR $SUITE-updates main contrib
deb $SECURITY_MIRROR $SUITE-security main contrib
SRC
}

# cache_key NAME FILE... : a short hash of the given files' contents and of NAME.
cache_key() {
  local name=$1
  shift
  { echo "$name"; cat "$@"; } | sha256sum | cut -c1-16
}

# with_cache_lock CMD... : runs CMD holding the machine-wide cache lock: one builder at a time
# per machine, the cache being shared by every clone.
with_cache_lock() {
  local lock
  exec {lock}>"$CACHE_DIR/.lock"
  flock "$lock"
  "$@"
  flock -u "$lock"
  exec {lock}>&-
}

# cached OUT CMD... : runs CMD (which must write OUT.tmp) unless OUT exists; renames on success.
cached() {
  local out=$1
  shift
  if [ -e "$out" ]; then
    log "cached: $(basename "$out")"
    return 0
  fi
  local start=$SECONDS
  remove_tree "$out.tmp"
  "$@"
  mv "$out.tmp" "$out"
  log "built $(basename "$out") in $((SECONDS - start))s"
}

# remove_tree DIR : unmounts whatever an interrupted build left mounted under DIR, then removes it.
remove_tree() {
  local m
  [ -e "$1" ] || return 0
  for m in $(findmnt -rn -o TARGET | grep -F "$1/" | sort -r); do
    umount -l "$m" || die "cannot unmount $m"
  done
  rm -rf "$1"
}

# Stages: each announced by a `== NAME` line when it starts and one with its time when it
# ends, on the terminal even when it runs in a background lane, and a table of them all at the
# end (stages_summary). The table's rows live in a file, since background lanes are subshells:
# VMT_STAGES, when a caller (./demo) timed stages of its own first, else a fresh file here.
stages_start() {
  if [ -z "${VMT_STAGES:-}" ]; then
    export VMT_STAGES=$WORK_DIR/stages.tsv VMT_STAGES_T0=$EPOCHSECONDS
    : > "$VMT_STAGES"
  fi
  # The terminal, for the banners of stages whose output goes to a lane's log.
  exec {STAGE_TTY}>&2
}

# stage NAME CMD... : runs CMD (a function or a program) as the stage NAME. CMD runs with
# errexit as the caller has it: never call `stage` on the left of || or &&, which would turn
# errexit off inside CMD; a failure ends the script (or the lane), and the table shows the
# stage as not finished.
stage() {
  local name=$1 start=$EPOCHSECONDS where=${STAGE_LANE:+ [lane $STAGE_LANE]}
  shift
  printf '%s\t%d\trunning\n' "$name" "$start" >> "$VMT_STAGES"
  printf '[vm-tests %(%H:%M:%S)T] == %s%s\n' -1 "$name" "$where" >&"$STAGE_TTY"
  "$@"
  printf '%s\t%d\tdone\n' "$name" $((EPOCHSECONDS - start)) >> "$VMT_STAGES"
  printf '[vm-tests %(%H:%M:%S)T] == %s%s: done in %ds\n' -1 "$name" "$where" \
    $((EPOCHSECONDS - start)) >&"$STAGE_TTY"
}

# step NAME : for a sequence that is not one function per stage (the demo): ends the step
# begun before, if any, and begins NAME, a row of the table; step_end ends the last one.
step() {
  step_end
  STEP_NAME=$1 STEP_START=$EPOCHSECONDS
  printf '%s\t%d\trunning\n' "$STEP_NAME" "$STEP_START" >> "$VMT_STAGES"
}

step_end() {
  if [ -n "${STEP_NAME:-}" ]; then
    printf '%s\t%d\tdone\n' "$STEP_NAME" $((EPOCHSECONDS - STEP_START)) >> "$VMT_STAGES"
    STEP_NAME=
  fi
}

# lane NAME CMD... : runs CMD in the background (a subshell with errexit), its output in
# WORK_DIR/lane-NAME.log; the stages it runs still announce themselves on the terminal.
# lanes_wait collects every lane.
declare -A LANES=()
lane() {
  local name=$1
  shift
  ( STAGE_LANE=$name; "$@" ) > "$WORK_DIR/lane-$name.log" 2>&1 &
  LANES[$!]=$name
  log "lane $name started in the background (output: $WORK_DIR/lane-$name.log)"
}

# lanes_wait : waits for every lane, in the order they finish, saying every VMT_HEARTBEAT
# seconds (default 60) which stages are running and for how long. The first lane that fails
# fails the run: its log is shown, the other lanes are stopped. (It polls: `wait -n` does not
# see a job bash has already reaped, so a lane that fails at once would go unnoticed.)
lanes_wait() {
  local pid rc name beat=$EPOCHSECONDS
  while [ ${#LANES[@]} -gt 0 ]; do
    for pid in "${!LANES[@]}"; do
      ! _lane_running "$pid" || continue
      rc=0
      wait "$pid" || rc=$?
      name=${LANES[$pid]}
      unset "LANES[$pid]"
      if [ "$rc" != 0 ]; then
        log "lane $name FAILED (exit $rc); the end of its output ($WORK_DIR/lane-$name.log):"
        tail -n 60 "$WORK_DIR/lane-$name.log" | sed 's/^/    | /' >&2
        [ -s "$WORK_DIR/lane-$name.log" ] || log "(lane $name wrote nothing)"
        lanes_stop
        die "lane $name failed"
      fi
      log "lane $name finished"
    done
    [ ${#LANES[@]} -gt 0 ] || break
    sleep 1
    if [ $((EPOCHSECONDS - beat)) -ge "${VMT_HEARTBEAT:-60}" ]; then
      beat=$EPOCHSECONDS
      _stages_running
    fi
  done
}

# _lane_running PID : the lane's process is alive (not a zombie) and ours (not a reused pid).
_lane_running() {
  local ppid stat
  read -r ppid stat < <(ps -o ppid=,stat= -p "$1") || return 1
  [ "$ppid" = "$BASHPID" ] && [ "${stat:0:1}" != Z ]
}

# _stages_running : one line naming the stages that are running, with their time so far.
_stages_running() {
  local running
  running=$(awk -F'\t' -v now="$EPOCHSECONDS" '
    $3 == "running" { start[$1] = $2 }
    $3 == "done" { delete start[$1] }
    END { for (s in start) { printf "%s%s (%ds so far)", sep, s, now - start[s]; sep = "; " } }
  ' "$VMT_STAGES")
  [ -z "$running" ] || printf '[vm-tests %(%H:%M:%S)T] .. still running: %s\n' -1 "$running" >&"$STAGE_TTY"
}

# lanes_stop : stops the lanes still running, with everything they started (mmdebstrap, cargo).
lanes_stop() {
  local pid
  for pid in "${!LANES[@]}"; do
    log "stopping lane ${LANES[$pid]}"
    kill_tree "$pid"
    wait "$pid" 2>/dev/null || true
  done
  LANES=()
}

kill_tree() {
  local child
  for child in $(pgrep -P "$1"); do
    kill_tree "$child"
  done
  kill "$1" 2>/dev/null || true
}

# stages_summary : the table of this run's stages; a stage that started and never finished
# (it failed, or the run was interrupted) says so. The rows are in $VMT_STAGES: "NAME START
# running" when a stage starts, "NAME SECONDS done" when it ends.
stages_summary() {
  [ -s "${VMT_STAGES:-}" ] || return 0
  {
    echo
    echo "stages:"
    awk -F'\t' -v now="$EPOCHSECONDS" -v t0="$VMT_STAGES_T0" '
      !($1 in state) { order[n++] = $1; if (length($1) > w) w = length($1) }
      # A stage run twice (./test builds the base tree, then the VM tier finds it cached):
      # the sum of its runs.
      $3 == "done" { secs[$1] += $2 }
      { state[$1] = $3 }
      END {
        for (i = 0; i < n; i++) {
          s = order[i]
          if (state[s] == "done") printf "  %-" w "s %6ds\n", s, secs[s]
          else printf "  %-" w "s NOT FINISHED (failed or stopped)\n", s
        }
        printf "  %-" w "s %6ds\n", "wall clock", now - t0
      }' "$VMT_STAGES"
  } >&2
}
