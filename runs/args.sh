# Sourced first by every runs/*.sh, with the script's arguments. Their settings are environment
# variables (each script's header lists them), so an argument is a mistake, and a costly one (a
# study runs for hours): --help or -h prints the header and exits 0; anything else is refused
# in one line with exit 2, before anything runs.
if [ $# -gt 0 ]; then
  if [ "$1" = --help ] || [ "$1" = -h ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
  fi
  echo "error: $0 takes no arguments, got '$1': its settings are environment variables (see $0 --help)" >&2
  exit 2
fi
