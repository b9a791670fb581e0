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

# parse_args ARG...: a launch script's command line (the same for every script). It handles
#   --                      the rest go to the trainer (appended to the script's trainer_args)
#   --config.a.b=v          to the trainer (trainer_args)
#   -h, --help              the script's usage, then exit 0
#   --dry-run, --dry_run    DRY_RUN=1
#   --NAME=VALUE            set_option NAME VALUE, NAME as opt_name makes it (some_flag)
#   --NAME VALUE            the same; VALUE must not start with -- (then --NAME=VALUE is needed)
# through two functions that each script defines:
#   set_option NAME VALUE   sets the script's option NAME; returns 1 for a NAME it does not know.
#   set_option --FLAG       (one argument, as typed) sets the script's option FLAG, one without a
#                           value (e.g. --slurm); returns 1 when FLAG is no such option. Every --ARG
#                           without "=" is offered this way before it is read as --NAME VALUE.
#   script_arg ARG          any other argument: a positional, or an error.
# set_option runs as a condition, where set -e does not act: it should report bad values with die.
parse_args() {
  local arg name value
  while [ $# -gt 0 ]; do
    arg=$1
    shift
    case $arg in
      --) trainer_args+=("$@"); break ;;
      --config.*) trainer_args+=("$arg") ;;
      -h | --help) usage; exit 0 ;;
      --dry-run | --dry_run) DRY_RUN=1 ;;
      --*)
        name=$(opt_name "$arg")
        case $arg in
          *=*) value=${arg#*=} ;;
          *)
            if set_option "$arg"; then continue; fi
            case ${1:---} in --*) die "$arg needs a value ($arg=VALUE for values that start with --)" ;; esac
            value=$1
            shift
            ;;
        esac
        set_option "$name" "$value" || die "unknown option --$name (see --help)"
        ;;
      *) script_arg "$arg" ;;
    esac
  done
}
