#!/usr/bin/env bash
# launch_tpu.sh - create, set up, run, watch and delete Cloud TPU VMs / pods for rlcsd_jax.
#
# Every value comes from a flag or an RLCSD_* environment variable (flags win); nothing in
# this file needs editing.  Run `./launch_tpu.sh --help` for the synopsis.  docs/tpu.md walks
# through a whole run.  Works with bash >= 3.2 (macOS) and Linux.
set -euo pipefail

PROG=${0##*/}
# The text "$HOME" for the workers' shell (this script never expands it).
REMOTE_HOME=\"\$HOME\"

usage() {
  cat <<EOF
Usage: $PROG COMMAND [OPTIONS] [-- TRAINER_ARGS...]

Commands
  create    Create the TPU VM (gcloud compute tpus tpu-vm create), or a queued resource
            with --queued (gcloud compute tpus queued-resources create).
  setup     On every worker: get the code (--repo URL [--ref REF], resolved here to one
            commit; or --src DIR packed here once), create a Python 3.11 virtualenv with uv
            (the images' python3 is 3.10), install "jax[tpu]" and the package pinned by
            constraints/tpu.txt, optionally copy the data (--data gs://...) and a converted
            checkpoint (--ckpt gs://... [--ckpt_dest DIR]).
  run       On every worker: start VENV/bin/python -m rlcsd_jax.train --config=CONFIG
            --workdir=WORKDIR [TRAINER_ARGS after --] in the background (nohup,
            RLCSD_DISTRIBUTED=1), logging to ~/rlcsd_logs/train_worker<N>.log on worker N.
  tail      Follow the training log of worker 0 (or --worker N).
  ssh       Interactive shell on worker 0 (or --worker N); with '-- CMD...' run CMD instead
            (--worker all runs it on every worker).
  status    Print the TPU (or queued resource) state.  Exit 0 if it exists, 1 if not found.
  delete    Delete the TPU VM (queued resources: delete --force, which removes the node too).
  babysit   Loop: stop when WORKDIR/DONE exists (exit 0), or WORKDIR/FAILED exists while the
            TPU is READY (exit 1); when the TPU is PREEMPTED / TERMINATED / STOPPED / SUSPENDED / FAILED / missing,
            delete it, create it again, run setup and run (the same commit and versions every
            time; the trainer resumes from the last checkpoint in WORKDIR); sleep --interval
            seconds between checks; give up (exit 1) when one more recreation would exceed
            --max_attempts.

Options (flag / environment variable; flags override the environment; '_' and '-' are
interchangeable in flag names; --flag VALUE and --flag=VALUE both work)
  --name NAME             RLCSD_TPU_NAME         TPU VM / queued resource name       [required]
  --zone ZONE             RLCSD_ZONE             e.g. us-central2-b                  [required]
  --project PROJECT       RLCSD_PROJECT          default: gcloud's configured project
  --queued | --no-queued  RLCSD_QUEUED=1         use a queued resource (node id = NAME)
  --dry-run               RLCSD_DRY_RUN=1        print the gcloud/gsutil commands, run nothing
 create
  --accelerator TYPE      RLCSD_ACCELERATOR      v4-8, v4-64, v5e-16 (= v5litepod-16), v5p-32,
                                                 v6e-8, ...                          [required]
  --version VERSION       RLCSD_RUNTIME_VERSION  TPU software version; default by generation:
                                                 v2/v3/v4 tpu-ubuntu2204-base, v5e
                                                 v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                                                 v6e v2-alpha-tpuv6e  (alias --runtime_version)
  --spot | --no-spot      RLCSD_SPOT=1           spot capacity (VM and queued resource)
  --create_arg ARG        (repeatable)           extra flag for the gcloud create command,
                                                 e.g. --create_arg=--network=my-net
  --wait                                         queued create: wait until ACTIVE
 setup
  --repo URL              RLCSD_REPO             git URL cloned on every worker
  --ref REF               RLCSD_REF              branch, tag or commit (default: remote HEAD);
                                                 resolved once (git ls-remote) to a commit
  --src DIR               RLCSD_SRC              local checkout packed (git-tracked and
                                                 untracked non-ignored files) and copied
  --remote_dir DIR        RLCSD_REMOTE_DIR       code dir on the workers (default ~/rlcsd_jax)
  --python VERSION        RLCSD_PYTHON           Python of the workers' virtualenv, installed
                                                 by uv (default 3.11; >= 3.11)
  --venv DIR              RLCSD_VENV             the virtualenv (default ~/rlcsd_venv)
  --constraints FILE      RLCSD_CONSTRAINTS      pins, relative to --remote_dir (default
                                                 constraints/tpu.txt; 'none' = unpinned)
  --extras LIST           RLCSD_EXTRAS           package extras to install, e.g. wandb
  --data gs://...         RLCSD_DATA             data folder (e.g. prepared by
                                                 rlcsd_jax.data.prepare) to copy
  --data_dest DIR         RLCSD_DATA_DEST        default <remote_dir>/data/verl
  --ckpt gs://...         RLCSD_CKPT             converted checkpoint folder to copy
  --ckpt_dest DIR         RLCSD_CKPT_DEST        default ~/checkpoints/<basename of --ckpt>
 run
  --config PATH           RLCSD_CONFIG           e.g. configs/qwen3_1p7b.py (relative to
                                                 --remote_dir)                       [required]
  --workdir gs://...      RLCSD_WORKDIR          checkpoints/logs; must be on GCS    [required]
  --env KEY=VALUE         (repeatable)           extra environment for the trainer
  --force                                        stop a trainer this script started before
  --done_marker NAME      RLCSD_DONE_MARKER      worker 0 writes WORKDIR/NAME (default DONE)
                                                 when the trainer exits 0, WORKDIR/FAILED when
                                                 it exits non-zero; neither if a SIGTERM/SIGINT
                                                 (preemption, --force) came first or within
  --marker_grace SECONDS  RLCSD_MARKER_GRACE     this many seconds after the exit (default 120)
  -- TRAINER_ARGS                                passed through, e.g. --config.seed=1
 tail / ssh
  --worker N              RLCSD_WORKER           worker index or 'all' (default 0)
  --lines N                                      tail: lines of history (default 100)
 delete
  --quiet                                        do not ask for confirmation
 babysit (also takes every create, setup and run option)
  --interval SECONDS      RLCSD_INTERVAL         between checks (default 300)
  --max_attempts N        RLCSD_MAX_ATTEMPTS     most (re)creations (default 10)
                                                 babysit ends at WORKDIR/DONE (exit 0), or at
                                                 WORKDIR/FAILED while the TPU is READY (exit 1)

Examples
  export RLCSD_PROJECT=my-proj RLCSD_ZONE=us-central2-b RLCSD_TPU_NAME=rlcsd-v4
  $PROG create --accelerator v4-64 --spot
  $PROG setup --repo https://github.com/me/rlcsd_jax.git --ckpt gs://b/ckpt/qwen3_1p7b_jax \\
      --data gs://b/data/verl
  $PROG run --config configs/qwen3_1p7b.py --workdir gs://b/runs/q17 -- --config.seed=1
  $PROG tail --worker 3
  $PROG babysit --accelerator v4-64 --spot --repo https://github.com/me/rlcsd_jax.git \\
      --config configs/qwen3_1p7b.py --workdir gs://b/runs/q17 --interval 300
  $PROG delete --quiet
EOF
}

# ---------------------------------------------------------------------------------- helpers

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

log() {
  printf '[%s %s] %s\n' "$PROG" "$(date +%H:%M:%S)" "$*" >&2
}

is_true() {
  case $1 in
    1 | true | TRUE | True | yes | YES | on) return 0 ;;
    *) return 1 ;;
  esac
}

# Quote one word for a POSIX shell (single quotes unless it is plainly safe).
shquote() {
  local s=$1 sq="'" esc="'\\''"
  case $s in
    '') printf "''" ;;
    *[!A-Za-z0-9_./:=@%+,-]*) printf "'%s'" "${s//$sq/$esc}" ;;
    *) printf '%s' "$s" ;;
  esac
}

# Quote a whole command line.
qjoin() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(shquote "$a")"
  done
  printf '%s' "$out"
}

# Quote a path for the workers' shell, keeping a leading ~ as $HOME.
rpath() {
  case $1 in
    \~) printf '%s' "$REMOTE_HOME" ;;
    \~/*) printf '%s/%s' "$REMOTE_HOME" "$(shquote "${1#\~/}")" ;;
    *) shquote "$1" ;;
  esac
}

# Run (or, with --dry-run, print) an external command.
x() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\n' "$(qjoin "$@")"
    return 0
  fi
  log "+ $(qjoin "$@")"
  "$@"
}

# gcloud with the project appended when one is configured.
gc() {
  if [ -n "$PROJECT" ]; then
    x gcloud "$@" "--project=$PROJECT"
  else
    x gcloud "$@"
  fi
}

TMP_DIR=""
cleanup() {
  if [ -n "$TMP_DIR" ]; then rm -rf "$TMP_DIR"; fi
}
trap cleanup EXIT

tmp_dir() {
  if [ -z "$TMP_DIR" ]; then TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/launch_tpu.XXXXXX"); fi
}

require() { # VALUE FLAG ENV WHAT
  if [ -z "$1" ]; then
    die "missing $4: pass $2 or set $3"
  fi
}

# ---------------------------------------------------------------------------- configuration

NAME=${RLCSD_TPU_NAME:-}
ZONE=${RLCSD_ZONE:-}
PROJECT=${RLCSD_PROJECT:-}
ACCELERATOR=${RLCSD_ACCELERATOR:-}
VERSION=${RLCSD_RUNTIME_VERSION:-}
SPOT=0
if is_true "${RLCSD_SPOT:-0}"; then SPOT=1; fi
QUEUED=0
if is_true "${RLCSD_QUEUED:-0}"; then QUEUED=1; fi
DRY_RUN=0
if is_true "${RLCSD_DRY_RUN:-0}"; then DRY_RUN=1; fi
REPO=${RLCSD_REPO:-}
REF=${RLCSD_REF:-}
SRC=${RLCSD_SRC:-}
TILDE='~'
REMOTE_DIR=${RLCSD_REMOTE_DIR:-"$TILDE/rlcsd_jax"}
PYTHON=${RLCSD_PYTHON:-3.11}
VENV=${RLCSD_VENV:-"$TILDE/rlcsd_venv"}
CONSTRAINTS=${RLCSD_CONSTRAINTS:-constraints/tpu.txt}
EXTRAS=${RLCSD_EXTRAS:-}
DATA=${RLCSD_DATA:-}
DATA_DEST=${RLCSD_DATA_DEST:-}
# uv (a single binary) creates the workers' virtualenv with its own Python build: the TPU
# images' python3 is 3.10, and jax >= 0.7, flax 0.12, orbax and transformers 5 need >= 3.11.
UV_VERSION=0.13.9
CKPT=${RLCSD_CKPT:-}
CKPT_DEST=${RLCSD_CKPT_DEST:-}
CONFIG=${RLCSD_CONFIG:-}
WORKDIR=${RLCSD_WORKDIR:-}
WORKER=${RLCSD_WORKER:-0}
LINES=100
INTERVAL=${RLCSD_INTERVAL:-300}
MAX_ATTEMPTS=${RLCSD_MAX_ATTEMPTS:-10}
DONE_MARKER=${RLCSD_DONE_MARKER:-DONE}
MARKER_GRACE=${RLCSD_MARKER_GRACE:-120}
QUIET=0
FORCE=0
WAIT=0
CMD=""
CREATE_ARGS=()
ENV_VARS=()
EXTRA=()
HAVE_EXTRA=0

while [ $# -gt 0 ]; do
  arg=$1
  shift
  case $arg in
    --)
      EXTRA=("$@")
      HAVE_EXTRA=1
      break
      ;;
    -h | --help | help)
      usage
      exit 0
      ;;
    --*)
      key=${arg%%=*}
      key=${key//_/-}
      has_val=0
      val=""
      case $arg in *=*) has_val=1 val=${arg#*=} ;; esac
      case $key in
        --spot | --no-spot | --queued | --no-queued | --dry-run | --quiet | --force | --wait)
          [ "$has_val" = 0 ] || die "$key takes no value"
          case $key in
            --spot) SPOT=1 ;;
            --no-spot) SPOT=0 ;;
            --queued) QUEUED=1 ;;
            --no-queued) QUEUED=0 ;;
            --dry-run) DRY_RUN=1 ;;
            --quiet) QUIET=1 ;;
            --force) FORCE=1 ;;
            --wait) WAIT=1 ;;
          esac
          ;;
        --name | --tpu-name | --zone | --project | --accelerator | --accelerator-type | \
          --version | --runtime-version | --create-arg | --repo | --ref | --src | \
          --remote-dir | --python | --venv | --constraints | --extras | --data | --data-dest | \
          --ckpt | --ckpt-dest | --config | --workdir | --env | \
          --worker | --lines | --interval | --max-attempts | --done-marker | --marker-grace)
          if [ "$has_val" = 0 ]; then
            [ $# -gt 0 ] || die "$key needs a value"
            val=$1
            shift
          fi
          case $key in
            --name | --tpu-name) NAME=$val ;;
            --zone) ZONE=$val ;;
            --project) PROJECT=$val ;;
            --accelerator | --accelerator-type) ACCELERATOR=$val ;;
            --version | --runtime-version) VERSION=$val ;;
            --create-arg) CREATE_ARGS+=("$val") ;;
            --repo) REPO=$val ;;
            --ref) REF=$val ;;
            --src) SRC=$val ;;
            --remote-dir) REMOTE_DIR=$val ;;
            --python) PYTHON=$val ;;
            --venv) VENV=$val ;;
            --constraints) CONSTRAINTS=$val ;;
            --extras) EXTRAS=$val ;;
            --data) DATA=$val ;;
            --data-dest) DATA_DEST=$val ;;
            --ckpt) CKPT=$val ;;
            --ckpt-dest) CKPT_DEST=$val ;;
            --config) CONFIG=$val ;;
            --workdir) WORKDIR=$val ;;
            --env) ENV_VARS+=("$val") ;;
            --worker) WORKER=$val ;;
            --lines) LINES=$val ;;
            --interval) INTERVAL=$val ;;
            --max-attempts) MAX_ATTEMPTS=$val ;;
            --done-marker) DONE_MARKER=$val ;;
            --marker-grace) MARKER_GRACE=$val ;;
          esac
          ;;
        --config.*)
          die "unknown option $key; trainer overrides go after '--', e.g. $PROG run ... -- $arg"
          ;;
        *) die "unknown option $key (see $PROG --help)" ;;
      esac
      ;;
    -*) die "unknown option $arg (see $PROG --help)" ;;
    *)
      [ -z "$CMD" ] || die "unexpected argument '$arg' (trainer arguments go after '--')"
      CMD=$arg
      ;;
  esac
done

[ -n "$CMD" ] || {
  usage >&2
  exit 2
}

# ------------------------------------------------------------------------------- validation

check_common() {
  require "$NAME" --name RLCSD_TPU_NAME "TPU name"
  require "$ZONE" --zone RLCSD_ZONE "zone (e.g. us-central2-b)"
  case $NAME in
    [a-z]*[!a-z0-9-]* | [!a-z]* | *-) die "bad TPU name '$NAME': use lower-case letters, digits and '-', starting with a letter" ;;
  esac
  case $ZONE in
    *[!a-z0-9-]*) die "bad zone '$ZONE'" ;;
  esac
}

is_uint() {
  case $1 in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac
}

check_worker() {
  [ "$WORKER" = all ] || is_uint "$WORKER" || die "--worker must be a number or 'all', got '$WORKER'"
}

# Normalise the accelerator type and pick the runtime version for its generation.
check_create() {
  require "$ACCELERATOR" --accelerator RLCSD_ACCELERATOR "accelerator type (e.g. v4-8, v5e-16, v5p-32)"
  case $ACCELERATOR in
    v5e-*) ACCELERATOR=v5litepod-${ACCELERATOR#v5e-} ;;
  esac
  case $ACCELERATOR in
    v[0-9]*-[0-9]*) ;;
    *) die "bad accelerator type '$ACCELERATOR' (expected e.g. v4-8, v5e-16, v5p-32)" ;;
  esac
  is_uint "${ACCELERATOR##*-}" || die "bad accelerator type '$ACCELERATOR'"
  if [ -z "$VERSION" ]; then
    case ${ACCELERATOR%-*} in
      v2 | v3 | v4) VERSION=tpu-ubuntu2204-base ;;
      v5litepod) VERSION=v2-alpha-tpuv5-lite ;;
      v5p) VERSION=v2-alpha-tpuv5 ;;
      v6e) VERSION=v2-alpha-tpuv6e ;;
      *) die "no default runtime version for '$ACCELERATOR': pass --version or set RLCSD_RUNTIME_VERSION" ;;
    esac
  fi
}

check_setup() {
  if [ -n "$REPO" ] && [ -n "$SRC" ]; then die "give either --repo or --src, not both"; fi
  if [ -z "$REPO" ] && [ -z "$SRC" ]; then
    die "missing code source: pass --repo URL (or RLCSD_REPO) or --src DIR (or RLCSD_SRC)"
  fi
  if [ -n "$SRC" ] && [ ! -d "$SRC" ]; then die "--src $SRC is not a directory"; fi
  [ -n "$REMOTE_DIR" ] || die "--remote_dir is empty"
  [ -n "$VENV" ] || die "--venv is empty"
  case $PYTHON in
    3.1[1-9] | 3.1[1-9].* | 3.[2-9][0-9] | 3.[2-9][0-9].* | /*) ;;
    *) die "--python must be 3.11 or newer (a version uv installs, or an interpreter path), got '$PYTHON'" ;;
  esac
  case $EXTRAS in *[!a-z0-9,_-]*) die "bad --extras '$EXTRAS' (want e.g. wandb or wandb,tfds)" ;; esac
  if [ -n "$DATA" ]; then
    case $DATA in gs://?*) ;; *) die "--data must be a gs:// folder, got '$DATA'" ;; esac
    DATA=${DATA%/}
    if [ -z "$DATA_DEST" ]; then DATA_DEST="${REMOTE_DIR%/}/data/verl"; fi
  fi
  if [ -n "$CKPT" ]; then
    case $CKPT in gs://?*) ;; *) die "--ckpt must be a gs:// folder, got '$CKPT'" ;; esac
    CKPT=${CKPT%/}
    if [ -z "$CKPT_DEST" ]; then CKPT_DEST="$TILDE/checkpoints/${CKPT##*/}"; fi
  fi
}

check_run() {
  require "$CONFIG" --config RLCSD_CONFIG "trainer config (e.g. configs/qwen3_1p7b.py)"
  require "$WORKDIR" --workdir RLCSD_WORKDIR "workdir (gs://bucket/path)"
  case $WORKDIR in
    gs://?*) ;;
    *) die "--workdir must be on GCS (gs://...): every worker and every recreated VM must see it; got '$WORKDIR'" ;;
  esac
  WORKDIR=${WORKDIR%/}
  case $DONE_MARKER in '' | */* | FAILED) die "bad --done_marker '$DONE_MARKER'" ;; esac
  is_uint "$MARKER_GRACE" || die "--marker_grace must be a whole number of seconds, got '$MARKER_GRACE'"
  local kv
  for kv in ${ENV_VARS[@]+"${ENV_VARS[@]}"}; do
    case $kv in
      [A-Za-z_]*=*) case ${kv%%=*} in *[!A-Za-z0-9_]*) die "bad --env '$kv' (want KEY=VALUE)" ;; esac ;;
      *) die "bad --env '$kv' (want KEY=VALUE)" ;;
    esac
  done
}

check_babysit() {
  is_uint "$INTERVAL" || die "--interval must be a whole number of seconds, got '$INTERVAL'"
  is_uint "$MAX_ATTEMPTS" || die "--max_attempts must be a whole number, got '$MAX_ATTEMPTS'"
}

no_extra() {
  [ "$HAVE_EXTRA" = 0 ] || die "'$CMD' takes no arguments after '--'"
}

# -------------------------------------------------------------------------- remote scripts

# Worker index from the TPU metadata server (what JAX reads too); hostname if unavailable.
worker_id_sh() {
  cat <<'EOF'
W=$(curl -sf -m 5 -H "Metadata-Flavor: Google" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null) || W=""
[ -n "$W" ] || W=$(hostname)
EOF
}

# Run on each worker by `run`.  Expects RLCSD_DIR, RLCSD_WORKDIR, RLCSD_MARKER, RLCSD_GRACE,
# RLCSD_FORCE and the trainer command in "$@".  The wrapper started here writes WORKDIR/DONE
# (exit 0) or WORKDIR/FAILED (non-zero) from worker 0, but only when neither the trainer's exit
# nor the following grace period coincided with a SIGTERM/SIGINT: on a multi-host slice the
# trainer also stops (and exits 0) at JAX's preemption sync point when ANOTHER host got the
# preemption notice, before this VM is signalled itself.
run_body() {
  cat <<'EOF'
mkdir -p "$HOME/rlcsd_logs" || exit 1
cd "$RLCSD_DIR" || { echo "launch_tpu: $RLCSD_DIR missing on $(hostname); run setup first" >&2; exit 1; }
[ -x "$RLCSD_VENV/bin/python" ] || { echo "launch_tpu: no $RLCSD_VENV on $(hostname); run setup first" >&2; exit 1; }
EOF
  worker_id_sh
  cat <<'EOF'
LOG="$HOME/rlcsd_logs/train_worker$W.log"
PIDF="$HOME/rlcsd_logs/train.pid"
if [ -s "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; then
  OLD=$(cat "$PIDF")
  if [ "$RLCSD_FORCE" != 1 ]; then
    echo "launch_tpu: worker $W: a trainer is already running (pid $OLD); use run --force to stop it first" >&2
    exit 1
  fi
  echo "launch_tpu: worker $W: stopping the running trainer (process group $OLD)"
  kill -TERM -- "-$OLD" 2>/dev/null || kill -TERM "$OLD" 2>/dev/null || true
  i=0
  while kill -0 "$OLD" 2>/dev/null && [ "$i" -lt 900 ]; do sleep 1; i=$((i + 1)); done
  kill -KILL -- "-$OLD" 2>/dev/null || true
fi
if [ "$W" = 0 ]; then
  gcloud storage rm --quiet "$RLCSD_WORKDIR/$RLCSD_MARKER" >/dev/null 2>&1 || true
  gcloud storage rm --quiet "$RLCSD_WORKDIR/FAILED" >/dev/null 2>&1 || true
fi
WRAPPER='w=$1; wd=$2; marker=$3; grace=$4; shift 4
now() { date -u +%Y-%m-%dT%H:%M:%SZ; }
sig=0
trap "sig=1" TERM INT
echo "[launch_tpu] $(now) worker $w ($(hostname)) starting: $*"
"$@" &
child=$!
rc=0; wait "$child" || rc=$?
while [ "$sig" = 1 ] && [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null; do
  rc=0; wait "$child" || rc=$?
done
echo "[launch_tpu] $(now) worker $w: trainer exited with status $rc (signal received: $sig)"
if [ "$w" = 0 ] && [ "$sig" = 0 ]; then
  if [ "$rc" = 0 ]; then m=$marker; else m=FAILED; fi
  if [ "$grace" -gt 0 ]; then
    echo "[launch_tpu] $(now) writing $wd/$m in ${grace}s unless this VM is stopped first"
    sleep "$grace" &
    wait "$!"
  fi
  if [ "$sig" = 0 ]; then
    echo "rc=$rc host=$(hostname) time=$(now)" >"$HOME/rlcsd_logs/$m"
    gcloud storage cp "$HOME/rlcsd_logs/$m" "$wd/$m" || echo "[launch_tpu] could not write $wd/$m"
  else
    echo "[launch_tpu] $(now) signal received: not writing $wd/$m"
  fi
fi
exit "$rc"'
setsid nohup bash -c "$WRAPPER" rlcsd-train "$W" "$RLCSD_WORKDIR" "$RLCSD_MARKER" "$RLCSD_GRACE" "$@" >>"$LOG" 2>&1 </dev/null &
echo "$!" >"$PIDF"
echo "launch_tpu: worker $W ($(hostname)): trainer started (pid $!), log $LOG"
EOF
}

# --------------------------------------------------------------------------------- commands

tpu_create() {
  local cmd
  if [ "$QUEUED" = 1 ]; then
    cmd=(compute tpus queued-resources create "$NAME" "--zone=$ZONE" "--node-id=$NAME"
      "--accelerator-type=$ACCELERATOR" "--runtime-version=$VERSION")
  else
    cmd=(compute tpus tpu-vm create "$NAME" "--zone=$ZONE"
      "--accelerator-type=$ACCELERATOR" "--version=$VERSION")
  fi
  if [ "$SPOT" = 1 ]; then cmd+=(--spot); fi
  cmd+=(${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"})
  gc "${cmd[@]}"
}

tpu_delete() { # [--quiet]
  local cmd
  if [ "$QUEUED" = 1 ]; then
    cmd=(compute tpus queued-resources delete "$NAME" "--zone=$ZONE" --force)
  else
    cmd=(compute tpus tpu-vm delete "$NAME" "--zone=$ZONE")
  fi
  if [ "${1:-}" = --quiet ]; then cmd+=(--quiet); fi
  gc "${cmd[@]}"
}

# Sets STATE to the TPU (or queued resource) state in upper case, NOT_FOUND, or ERROR.
STATE=""
tpu_state() {
  local cmd out rc=0
  if [ "$QUEUED" = 1 ]; then
    cmd=(compute tpus queued-resources describe "$NAME" "--zone=$ZONE" "--format=value(state.state)")
  else
    cmd=(compute tpus tpu-vm describe "$NAME" "--zone=$ZONE" "--format=value(state)")
  fi
  if [ "$DRY_RUN" = 1 ]; then
    gc "${cmd[@]}"
    STATE=DRY_RUN
    return 0
  fi
  tmp_dir
  out=$(gc "${cmd[@]}" 2>"$TMP_DIR/describe.err") || rc=$?
  if [ "$rc" = 0 ]; then
    STATE=$(printf '%s\n' "$out" | awk 'NF { s = $1 } END { print toupper(s) }')
    [ -n "$STATE" ] || STATE=UNKNOWN
  elif grep -qiE 'NOT_FOUND|not found|was not found' "$TMP_DIR/describe.err"; then
    STATE=NOT_FOUND
  else
    STATE=ERROR
    grep -v '^\[' "$TMP_DIR/describe.err" >&2 || true
  fi
}

ssh_all() { # COMMAND_STRING
  gc compute tpus tpu-vm ssh "$NAME" "--zone=$ZONE" --worker=all --quiet "--command=$1"
}

# ------------------------------------------------------------------------- the code, once
# `setup` and every `babysit` recreation install the same code: --ref is resolved to a commit
# once per invocation (pass --ref COMMIT to pin it across invocations too), --src is packed once.

COMMIT=""
REVISION=""
TARBALL=""

resolve_ref() { # sets COMMIT
  local ref=${REF:-HEAD} out
  if [ ${#ref} = 40 ] && [ -z "${ref//[0-9a-f]/}" ]; then
    COMMIT=$ref
    return 0
  fi
  if [ "$DRY_RUN" = 1 ]; then
    printf '# %s   (resolves %s to one commit; not run in a dry run)\n' \
      "$(qjoin git ls-remote "$REPO" "$ref")" "$ref"
    COMMIT="<commit of $ref>"
    return 0
  fi
  out=$(git ls-remote "$REPO" "$ref" 2>&1) || die "git ls-remote $REPO $ref failed: $out"
  # A branch or HEAD: its line; an annotated tag: the commit it points to (the ^{} line).
  COMMIT=$(printf '%s\n' "$out" | awk -v r="$ref" '
    $2 == r || $2 == "refs/heads/" r { c = $1 }
    $2 == "refs/tags/" r && t == "" { t = $1 }
    $2 == "refs/tags/" r "^{}" { t = $1 }
    END { print (c != "" ? c : t) }')
  if [ ${#COMMIT} != 40 ] || [ -n "${COMMIT//[0-9a-f]/}" ]; then
    die "could not resolve --ref $ref in $REPO (a branch, tag or full 40-character commit)"
  fi
  log "code: $REPO at $ref = $COMMIT (every setup of this '$CMD' uses this commit)"
}

pack_src() { # sets TARBALL and REVISION
  REVISION=unknown
  if command -v git >/dev/null 2>&1 && git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    REVISION=$(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo unknown)
    if [ -n "$(git -C "$SRC" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
      REVISION="$REVISION+dirty"
    fi
  fi
  if [ "$DRY_RUN" = 1 ]; then
    TARBALL="${TMPDIR:-/tmp}/launch_tpu.XXXXXX/rlcsd_src.tar.gz"
    printf '# pack %s (git-tracked and untracked non-ignored files; revision %s) into %s\n' \
      "$SRC" "$REVISION" "$TARBALL"
    return 0
  fi
  tmp_dir
  TARBALL="$TMP_DIR/rlcsd_src.tar.gz"
  log "packing $SRC ($REVISION) into $TARBALL"
  if command -v git >/dev/null 2>&1 && git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (
      cd "$SRC"
      git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
        if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
      done | COPYFILE_DISABLE=1 tar -czf "$TARBALL" --null -T -
    )
  else
    COPYFILE_DISABLE=1 tar -czf "$TARBALL" -C "$SRC" --exclude=.git .
  fi
}

prepare_code() {
  if [ -n "$SRC" ]; then pack_src; else resolve_ref; fi
}

setup_src_body() {
  cat <<'EOF'
mkdir -p "$RLCSD_DIR"
tar -xzf "$HOME/rlcsd_src.tar.gz" -C "$RLCSD_DIR"
rm -f "$HOME/rlcsd_src.tar.gz"
printf '%s\n' "$RLCSD_REVISION" >"$RLCSD_DIR/REVISION"
EOF
}

setup_git_body() {
  cat <<'EOF'
if [ -d "$RLCSD_DIR/.git" ]; then
  git -C "$RLCSD_DIR" remote set-url origin "$RLCSD_REPO"
else
  git clone "$RLCSD_REPO" "$RLCSD_DIR"
fi
git -C "$RLCSD_DIR" fetch --tags origin "$RLCSD_REF"
git -C "$RLCSD_DIR" cat-file -e "$RLCSD_COMMIT^{commit}" 2>/dev/null ||
  git -C "$RLCSD_DIR" fetch origin "$RLCSD_COMMIT"
git -C "$RLCSD_DIR" checkout --detach "$RLCSD_COMMIT"
EOF
}

# A Python >= 3.11 virtualenv made by a pinned uv, then JAX for TPU and the package (no test
# extra: it pulls torch, which a TPU worker does not need), every version from the constraints.
setup_install_body() {
  cat <<'EOF'
cd "$RLCSD_DIR"
UV="$HOME/.local/bin/uv"
if ! "$UV" --version 2>/dev/null | grep -qF "uv $RLCSD_UV_VERSION"; then
  python3 -m pip install --user --quiet "uv==$RLCSD_UV_VERSION" ||
    curl -LsSf "https://astral.sh/uv/$RLCSD_UV_VERSION/install.sh" | env UV_NO_MODIFY_PATH=1 sh
fi
"$UV" venv --allow-existing --python "$RLCSD_PYTHON" "$RLCSD_VENV"
"$RLCSD_VENV/bin/python" -c 'import sys; v = sys.version_info; assert v >= (3, 11), "Python %d.%d < 3.11" % v[:2]'
PKG=.
if [ -n "$RLCSD_EXTRAS" ]; then PKG=".[$RLCSD_EXTRAS]"; fi
if [ "$RLCSD_CONSTRAINTS" = none ]; then
  "$UV" pip install --python "$RLCSD_VENV/bin/python" "jax[tpu]" -e "$PKG"
else
  [ -f "$RLCSD_CONSTRAINTS" ] || { echo "launch_tpu: $RLCSD_DIR/$RLCSD_CONSTRAINTS missing" >&2; exit 1; }
  "$UV" pip install --python "$RLCSD_VENV/bin/python" -c "$RLCSD_CONSTRAINTS" "jax[tpu]" -e "$PKG"
fi
EOF
}

setup_data_body() {
  cat <<'EOF'
mkdir -p "$RLCSD_DATA_DEST"
gcloud storage cp -r "$RLCSD_DATA/*" "$RLCSD_DATA_DEST/"
EOF
}

setup_ckpt_body() {
  cat <<'EOF'
mkdir -p "$RLCSD_CKPT_DEST"
gcloud storage cp -r "$RLCSD_CKPT/*" "$RLCSD_CKPT_DEST/"
EOF
}

setup_done_body() {
  cat <<'EOF'
echo "launch_tpu: $(hostname): set up in $RLCSD_DIR ($("$RLCSD_VENV/bin/python" --version 2>&1) in $RLCSD_VENV)"
EOF
}

# Call prepare_code first (once per invocation).
do_setup() {
  local script nl='
'
  script="set -e${nl}RLCSD_DIR=$(rpath "$REMOTE_DIR")${nl}RLCSD_VENV=$(rpath "$VENV")${nl}"
  script+="RLCSD_PYTHON=$(shquote "$PYTHON")${nl}RLCSD_UV_VERSION=$UV_VERSION${nl}"
  script+="RLCSD_CONSTRAINTS=$(shquote "$CONSTRAINTS")${nl}RLCSD_EXTRAS=$(shquote "$EXTRAS")${nl}"
  if [ -n "$SRC" ]; then
    gc compute tpus tpu-vm scp "$TARBALL" "$NAME:rlcsd_src.tar.gz" "--zone=$ZONE" --worker=all --quiet || return 1
    script+="RLCSD_REVISION=$(shquote "$REVISION")${nl}$(setup_src_body)${nl}"
  else
    script+="RLCSD_REPO=$(shquote "$REPO")${nl}RLCSD_REF=$(shquote "${REF:-HEAD}")${nl}"
    script+="RLCSD_COMMIT=$(shquote "$COMMIT")${nl}$(setup_git_body)${nl}"
  fi
  script+="$(setup_install_body)${nl}"
  if [ -n "$DATA" ]; then
    script+="RLCSD_DATA=$(shquote "$DATA")${nl}RLCSD_DATA_DEST=$(rpath "$DATA_DEST")${nl}"
    script+="$(setup_data_body)${nl}"
  fi
  if [ -n "$CKPT" ]; then
    script+="RLCSD_CKPT=$(shquote "$CKPT")${nl}RLCSD_CKPT_DEST=$(rpath "$CKPT_DEST")${nl}"
    script+="$(setup_ckpt_body)${nl}"
  fi
  script+=$(setup_done_body)
  ssh_all "$script"
}

do_run() {
  local script kv train
  train=(-m rlcsd_jax.train "--config=$CONFIG" "--workdir=$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})
  script="RLCSD_DIR=$(rpath "$REMOTE_DIR")
RLCSD_VENV=$(rpath "$VENV")
RLCSD_WORKDIR=$(shquote "$WORKDIR")
RLCSD_MARKER=$(shquote "$DONE_MARKER")
RLCSD_GRACE=$MARKER_GRACE
RLCSD_FORCE=$FORCE
set -- \"\$RLCSD_VENV/bin/python\" $(qjoin "${train[@]}")
export RLCSD_DISTRIBUTED=1
"
  for kv in ${ENV_VARS[@]+"${ENV_VARS[@]}"}; do
    script+="export $(shquote "$kv")
"
  done
  script+=$(run_body)
  ssh_all "$script"
}

tail_body() {
  printf 'RLCSD_LINES=%s\n' "$LINES"
  worker_id_sh
  cat <<'EOF'
LOG="$HOME/rlcsd_logs/train_worker$W.log"
echo "==> $(hostname): $LOG <=="
tail -n "$RLCSD_LINES" -F "$LOG"
EOF
}

do_tail() {
  gc compute tpus tpu-vm ssh "$NAME" "--zone=$ZONE" "--worker=$WORKER" "--command=$(tail_body)"
}

do_ssh() {
  if [ "$HAVE_EXTRA" = 1 ] && [ ${#EXTRA[@]} -gt 0 ]; then
    gc compute tpus tpu-vm ssh "$NAME" "--zone=$ZONE" "--worker=$WORKER" "--command=${EXTRA[*]}"
  else
    [ "$WORKER" != all ] || die "an interactive ssh needs one worker (--worker N)"
    gc compute tpus tpu-vm ssh "$NAME" "--zone=$ZONE" "--worker=$WORKER"
  fi
}

# 0 if WORKDIR/NAME exists.
marker_exists() {
  if [ "$DRY_RUN" = 1 ]; then
    gc storage ls "$WORKDIR/$1"
    return 1
  fi
  gc storage ls "$WORKDIR/$1" >/dev/null 2>&1
}

wait_gone() {
  local i=0 pause=$((INTERVAL < 30 ? INTERVAL : 30))
  while [ "$i" -lt 60 ]; do
    tpu_state
    case $STATE in NOT_FOUND | DRY_RUN) return 0 ;; esac
    sleep "$pause"
    i=$((i + 1))
  done
  return 1
}

do_babysit() {
  local attempts=0 start_failures=0 pending=0
  if [ "$DRY_RUN" = 1 ]; then
    echo "# babysit: one check, then the recovery it performs when the TPU is gone"
    marker_exists "$DONE_MARKER" || true
    tpu_state
    marker_exists FAILED || true
    tpu_delete --quiet
    tpu_create
    do_setup
    do_run
    echo "# ...then sleep $INTERVAL s and check again (at most $MAX_ATTEMPTS recreations)"
    return 0
  fi
  log "babysitting $NAME in $ZONE: workdir $WORKDIR, every ${INTERVAL}s, at most $MAX_ATTEMPTS recreations"
  while :; do
    if marker_exists "$DONE_MARKER"; then
      log "$WORKDIR/$DONE_MARKER exists: training finished"
      return 0
    fi
    tpu_state
    case $STATE in
      READY | ACTIVE)
        if [ "$pending" = 0 ] && marker_exists FAILED; then
          log "$WORKDIR/FAILED exists: the trainer exited with an error; see '$PROG tail'"
          return 1
        fi
        if [ "$pending" = 1 ]; then
          if do_setup && do_run; then
            pending=0
            log "training (re)started on $NAME"
          else
            start_failures=$((start_failures + 1))
            log "setup/run failed ($start_failures of $MAX_ATTEMPTS)"
            if [ "$start_failures" -ge "$MAX_ATTEMPTS" ]; then
              log "giving up"
              return 1
            fi
          fi
        fi
        ;;
      PREEMPTED | TERMINATED | STOPPED | SUSPENDING | SUSPENDED | FAILED | NOT_FOUND)
        if [ "$attempts" -ge "$MAX_ATTEMPTS" ]; then
          log "$NAME is $STATE and $attempts of $MAX_ATTEMPTS recreations are used up: giving up"
          return 1
        fi
        attempts=$((attempts + 1))
        log "$NAME is $STATE: recreation $attempts of $MAX_ATTEMPTS"
        if [ "$STATE" != NOT_FOUND ]; then
          tpu_delete --quiet || log "delete failed"
          wait_gone || log "$NAME still exists after delete"
        fi
        if tpu_create; then
          pending=1
          continue # a TPU VM is READY once create returns; check at once
        fi
        log "create failed"
        ;;
      ERROR) log "could not read the state of $NAME; retrying" ;;
      *) log "$NAME is $STATE; waiting" ;;
    esac
    sleep "$INTERVAL"
  done
}

do_status() {
  tpu_state
  case $STATE in
    DRY_RUN) return 0 ;;
    NOT_FOUND)
      echo "$NAME ($ZONE): NOT_FOUND"
      return 1
      ;;
    ERROR) return 2 ;;
    *) echo "$NAME ($ZONE): $STATE" ;;
  esac
}

do_wait_active() {
  local pause=$((INTERVAL < 30 ? INTERVAL : 30))
  [ "$DRY_RUN" = 0 ] || return 0
  while :; do
    tpu_state
    case $STATE in
      READY | ACTIVE) log "$NAME is $STATE"; return 0 ;;
      FAILED | SUSPENDED | NOT_FOUND) log "$NAME is $STATE"; return 1 ;;
    esac
    log "$NAME is $STATE; waiting"
    sleep "$pause"
  done
}

case $CMD in
  create)
    no_extra
    check_common
    check_create
    tpu_create
    if [ "$WAIT" = 1 ] && [ "$QUEUED" = 1 ]; then
      check_babysit
      do_wait_active
    fi
    ;;
  setup)
    no_extra
    check_common
    check_setup
    prepare_code
    do_setup
    ;;
  run)
    check_common
    check_run
    do_run
    ;;
  tail)
    no_extra
    check_common
    check_worker
    is_uint "$LINES" || die "--lines must be a number"
    do_tail
    ;;
  ssh)
    check_common
    check_worker
    do_ssh
    ;;
  status)
    no_extra
    check_common
    do_status
    ;;
  delete)
    no_extra
    check_common
    if [ "$QUIET" = 1 ]; then tpu_delete --quiet; else tpu_delete; fi
    ;;
  babysit)
    check_common
    check_create
    check_setup
    check_run
    check_babysit
    prepare_code
    do_babysit
    ;;
  *) die "unknown command '$CMD' (see $PROG --help)" ;;
esac
