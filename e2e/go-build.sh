# Sourced by the build scripts beside it. `go_build ARGS...` runs `go build -v ARGS`, but
# rather than Go's list of every package it prints, on stderr, one line per 100 packages
# compiled with the seconds elapsed; anything else Go prints (compile errors) passes through.
# Returns go build's exit status. A warm Go build cache compiles nothing and prints nothing.
go_build() {
	_go_build_status=$(mktemp)
	{
		_go_build_rc=0
		go build -v "$@" 2>&1 || _go_build_rc=$?
		echo "$_go_build_rc" >"$_go_build_status"
	} | awk -v t0="$(date +%s)" '
		function now() { srand(); return srand() }
		/[ :]/ { print; fflush(); next }
		{ n++ }
		n % 100 == 0 { printf "  %d packages compiled (%ds)\n", n, now() - t0; fflush() }
		END { if (n % 100) printf "  %d packages compiled (%ds)\n", n, now() - t0 }' >&2
	_go_build_rc=$(cat "$_go_build_status")
	rm -f "$_go_build_status"
	return "$_go_build_rc"
}
