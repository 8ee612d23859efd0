# Shared by the launchers (sourced, not run): the error exit and argument quoting. `die` prints the caller's
# `usage` first line, so each launcher defines `usage` before calling it.

die() { printf 'error: %s\n' "$1" >&2; usage | head -n 1 >&2; exit 2; }

# Shell-quotes each argument so a printed (or remote) command is read back by a shell unchanged.
shell_quote() {
  local a out=()
  for a in "$@"; do
    if [[ -n $a && $a != *[!A-Za-z0-9_./:=@%+,-]* ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  printf '%s\n' "${out[*]}"
}
