# shellcheck shell=bash
# Shared helpers for the launch/*.sh scripts (sourced, not run). Works with bash 3.2 (macOS) and later.
#
# Conventions: errors are one line on stderr ("error: ...") with exit status 2; with DRY_RUN=1 each
# command is printed to stdout, shell-quoted so that it can be pasted, and nothing is run; without it
# each command is echoed to stderr with a "+ " prefix and then run.

# q WORD: WORD quoted for a POSIX shell; plain words (letters, digits, _@%+=:,./-) stay as they are.
q() {
  case $1 in
    '') printf "''" ;;
    *[!A-Za-z0-9_@%+=:,./-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}

# qjoin WORD...: the words quoted and joined by spaces (one command line).
qjoin() {
  local out='' w
  for w in "$@"; do
    out+="${out:+ }$(q "$w")"
  done
  printf '%s' "$out"
}

die() {
  echo "error: $*" >&2
  exit 2
}

note() {
  echo "$*" >&2
}

is_dry_run() {
  case ${DRY_RUN:-0} in
    1 | true | yes) return 0 ;;
    *) return 1 ;;
  esac
}

# run CMD...: print it (dry run) or echo and run it.
run() {
  if is_dry_run; then
    qjoin "$@"
    echo
  else
    echo "+ $(qjoin "$@")" >&2
    "$@"
  fi
}

# require VALUE MESSAGE: die with MESSAGE if VALUE is empty.
require() {
  [ -n "$1" ] || die "$2"
}

# require_int NAME VALUE [MIN]: VALUE is a non-negative integer (>= MIN).
require_int() {
  case $2 in
    '' | *[!0-9]*) die "$1 must be a non-negative integer, got '$2'" ;;
  esac
  if [ -n "${3:-}" ] && [ "$2" -lt "$3" ]; then
    die "$1 must be >= $3, got $2"
  fi
}

# opt_name ARG: "--some-flag=value" -> "some_flag" (dashes and underscores are interchangeable).
opt_name() {
  local k=${1%%=*}
  k=${k#--}
  printf '%s' "${k//-/_}"
}

# has_override PREFIX WORD...: whether one of the WORDs is PREFIX=... (e.g. --config.mesh.ici).
has_override() {
  local prefix=$1 w
  shift
  for w in "$@"; do
    case $w in "$prefix"=*) return 0 ;; esac
  done
  return 1
}
