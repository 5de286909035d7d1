# shellcheck shell=bash
# Sourced by install-deps.sh; tested by tests/installer.rs.

# The URI this machine already uses for Debian's main archive (suite
# "bookworm"), from one-line sources.list files or deb822 .sources files, so a
# machine behind a local mirror or proxy keeps using it. Empty if none.
# $1: the apt configuration directory (default /etc/apt).
bookworm_mirror() {
    local dir=${1:-/etc/apt} f
    for f in "$dir"/sources.list "$dir"/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        # deb [options] URI SUITE COMPONENT...
        awk '$1 == "deb" { sub(/^deb[ \t]+(\[[^]]*\][ \t]+)?/, "")
                           split($0, w, /[ \t]+/)
                           if (w[2] == "bookworm") { print w[1]; exit } }' "$f"
    done
    for f in "$dir"/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        # deb822 stanzas: a URIs: line, and a Suites: line naming bookworm.
        awk 'BEGIN { RS = ""; FS = "\n" }
             { uri = ""; hit = 0
               for (i = 1; i <= NF; i++) {
                   if ($i ~ /^URIs:/) { split($i, u, /[ \t]+/); uri = u[2] }
                   if ($i ~ /^Suites:/ && $i ~ /[ \t]bookworm([ \t]|$)/) hit = 1
               }
               if (hit && uri != "") { print uri; exit } }' "$f"
    done
}
