# shellcheck shell=bash
# Making a venv safely when several callers do it at once, and never mistaking a half-made one
# for a good one. Sourced by scripts/setup-test-env and scripts/setup-llama-env, which the
# external tests run on first use, several at the same time (cargo runs a file's tests in
# parallel); each script says what goes into its venv.
#
# Why the venv is built at its final path, under a lock, and not in a temporary directory renamed
# into place: `python -m venv` and pip write the venv's absolute path into it (pyvenv.cfg, the
# `#!` lines of bin/pip and every console script, bin/activate), so a venv renamed after it is
# built runs the wrong python or none. Instead:
#   - one lock per venv, the file "$venv.lock" beside it, held with flock(1) (util-linux) from
#     the check to the end of the build: of the callers that find the venv not ready, one builds
#     and the others wait, then find it ready. The kernel drops the lock when its holder dies
#     (with every child that inherited it), so a killed build never blocks the next one. The lock
#     file stays (removing it would let two callers lock two different files).
#   - a stamp, "$venv/.mofa-ready", holding what the venv was built from (the script's "spec":
#     its requirements, flags, pins). It is removed before anything in the venv changes and
#     written last (atomically, by rename), after the venv's python imports what it must. A venv
#     is ready only if its stamp matches the spec and the imports work; one killed half-way has
#     no stamp, so it is never taken for a good one, and the next caller repairs it.
#   - a venv this code made from nothing carries a marker, "$venv/.mofa-made", written before
#     `python -m venv` starts. A venv that is not sound (bin/python is not the venv's own, or
#     cannot run pip: e.g. killed while being made) is deleted and made again only if it is the
#     script's default path or carries the marker; any other (a user's own venv, named through
#     MOFA_VENV or MOFA_LLAMA_VENV) is never deleted: pip is reinstalled into it (ensurepip), or
#     the script stops and says why.
# setup-test-env reads a ready venv without the lock (its stamp is only removed under the lock,
# by a caller that found it not ready); setup-llama-env holds the lock throughout.

venv_who="$(basename "$0")"

venv_die() {
    echo "$venv_who: $*" >&2
    exit 1
}

# venv_ready VENV SPEC IMPORTS: whether VENV was completely built from SPEC and its python
# still imports IMPORTS (a Python import list, e.g. "openai, anthropic").
venv_ready() {
    [ "$(cat "$1/.mofa-ready" 2>/dev/null)" = "$2" ] &&
        "$1/bin/python" -c "import $3" >/dev/null 2>&1
}

# venv_lock VENV: takes the lock of VENV for the rest of the script (its parent is created).
venv_lock() {
    local v="$1"
    while [ "${v%/}" != "$v" ]; do v="${v%/}"; done # "dir/" must not lock "dir/.lock"
    command -v flock >/dev/null 2>&1 || venv_die "needs flock(1) (Debian: util-linux)"
    mkdir -p "$(dirname "$v")"
    exec {venv_lock_fd}>>"$v.lock"
    if ! flock -n "$venv_lock_fd"; then
        echo "$venv_who: waiting for another setup of $1" >&2
        flock "$venv_lock_fd"
    fi
}

# venv_unmark VENV: marks VENV as not ready, before anything in it changes (under the lock).
venv_unmark() {
    rm -f "$1/.mofa-ready"
}

# venv_mark VENV SPEC: marks VENV as completely built from SPEC; the last step of a build.
venv_mark() {
    printf '%s\n' "$2" >"$1/.mofa-ready.tmp"
    mv -f "$1/.mofa-ready.tmp" "$1/.mofa-ready"
}

# venv_sound VENV: whether VENV/bin/python is the python of a venv at VENV (not, say, a link to
# a python outside it, which pip would install into) and runs pip.
venv_sound() {
    venv_is_prefix "$1" && "$1/bin/python" -m pip --version >/dev/null 2>&1
}

venv_is_prefix() {
    "$1/bin/python" -c 'import os, sys
sys.exit(os.path.realpath(sys.prefix) != os.path.realpath(sys.argv[1]))' "$1" >/dev/null 2>&1
}

# venv_make VENV DEFAULT: makes sure VENV is a sound venv (venv_sound), making it if needed.
# DEFAULT is 1 when VENV is the script's own default path (which may be deleted and made again),
# 0 when it was named by the user (deleted only if this code made it: the .mofa-made marker).
venv_make() {
    local v="$1"
    if [ -e "$v" ] && ! venv_sound "$v"; then
        if [ "$2" = 1 ] || [ -e "$v/.mofa-made" ]; then
            echo "$venv_who: $v is half-made; making it again" >&2
            rm -rf "$v"
        elif [ -e "$v/bin/python" ] || [ -L "$v/bin/python" ]; then
            # Someone's venv: never deleted, nor made again over (that could change its python).
            venv_is_prefix "$v" ||
                venv_die "$v/bin/python is not a python of $v, not made here, so kept: repair or remove it"
            echo "$venv_who: $v has no working pip; reinstalling pip into it" >&2
            "$v/bin/python" -m ensurepip --upgrade >&2 ||
                venv_die "$v: could not reinstall pip into it; repair or remove it"
        fi
    fi
    if [ ! -e "$v/bin/python" ]; then
        if [ ! -e "$v" ] || [ -z "$(ls -A "$v")" ]; then
            mkdir -p "$v"
            : >"$v/.mofa-made"
        fi
        python3 -m venv "$v" >&2
    fi
    venv_sound "$v" || venv_die "$v is not a working venv (its python is not its own, or lacks pip)"
}
