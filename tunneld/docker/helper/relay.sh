# The relay script: runs in the helper container as one long-lived `docker exec` (a slot), as
#   /bin/sh -c SCRIPT kci-tunneld-relay CONNECT_TIMEOUT HOST PORT KEY PYTHON_RELAY
# (HOST PORT KEY: a target to prime a socat for at once, or empty; PYTHON_RELAY: the source of
# helper/relay.py, which takes over when the image has python3). Loaded by docker/execs.py, which
# drops the comment lines before sending it. POSIX sh: it must run under busybox ash and dash alike.
#
# One connection at a time over this exec. stdin: "C HOST PORT NONCE KEY", then frames: "LEN" + LEN
# bytes, "0" (upstream EOF), "F" (print NONCE on stdout: downstream is over), "Q" (connection over),
# "K" (kill this connection's relay), anything else kills this exec. stderr: "R MODE" (ready),
# "P PID" (the relay process for this connection), "C" (nc connected), socat's notices,
# "X STATUS" (relay exited), "D" (connection over, next request please). helper/relay.py, which
# takes over where python3 exists, reads the same stdin but answers in frames on stdout (see there).
#
# With socat and a FIFO (mkfifo in a writable /tmp), a socat for each target this exec has served
# is started ahead of time, blocked opening its FIFO: it has loaded and only connects once a request
# opens the FIFO, so a connection costs no process start. The shell keeps a read end of the FIFO
# open while writing to it, so a frame is never cut short by EPIPE (that would desynchronise the
# framing); a relay that dies mid-connection gets its exec retired instead. Without a FIFO, or with
# busybox nc, each connection forks a pipeline "frames | relay" and the relay drains what is left.
T=$1
if [ -n "$5" ] && command -v python3 >/dev/null 2>&1; then exec python3 -S -c "$5" "$T"; fi
exec 3>&1
trap '' PIPE
read -r _ _ _ _ pg _ </proc/self/stat
f=/tmp/.kci-tunneld-$$
die() { rm -f "$f"-*; if [ "$pg" = $$ ]; then kill 0; fi; exit 1; }
if command -v socat >/dev/null 2>&1; then mode=socat
elif command -v nc >/dev/null 2>&1; then mode=nc
else echo "Z the helper image has neither socat nor nc" >&2; exit 1; fi
fifo=
if [ $mode = socat ]; then
  rm -f "$f"-* 2>/dev/null
  if mkfifo "$f-probe" 2>/dev/null || busybox mkfifo "$f-probe" 2>/dev/null; then fifo=1; rm -f "$f-probe"; fi
fi
addr() { case $1 in *:*) a="[$1]:$2" ;; *) a="$1:$2" ;; esac; }  # sets $a (no subshell: no fork)
prime() {  # HOST PORT KEY (KEY: the target in hex, safe in a file name and in a socat address)
  [ -p "$f-$3" ] || mkfifo "$f-$3" 2>/dev/null || busybox mkfifo "$f-$3" || die
  addr "$1" "$2"
  socat -d -d -t 86400 -b 262144 "GOPEN:$f-$3,rdonly!!STDOUT" "TCP:$a,connect-timeout=$T" </dev/null &
  echo $! >"$f-$3.pid"
}
watch() {
  n=0
  while { read -r st </proc/$1/stat; } 2>/dev/null; do
    case ${st#*) } in Z*) return ;; esac
    l=$(ls -l /proc/$1/fd/ 2>/dev/null)
    case $l in *socket:*)
      ino=${l##*socket:\[}; ino=${ino%%\]*}
      if grep -qs "^ *[0-9]*: [0-9A-F]*:[0-9A-F]* [0-9A-F]*:[0-9A-F]* 0[18] .* $ino " /proc/net/tcp /proc/net/tcp6
      then echo C >&2; return; fi
    esac
    n=$((n+1)); [ $n -gt 3 ] && sleep 0.01
  done
}
frames() {
  while :; do
    read -r n || die
    case $n in
      [1-9]*) dd bs=262144 count="$n" iflag=count_bytes 2>/dev/null ;;
      0) exec >/dev/null 5>&- ;;
      F) printf %s "$nonce" >&3 ;;
      Q) return ;;
      K) if [ -n "$fifo" ]; then kill "$sp" 2>/dev/null; else die; fi ;;
      *) die ;;
    esac
  done
}
relay() {
  exec 3>&-
  if [ $mode = socat ]; then
    addr "$1" "$2"
    (read -r pid _ </proc/self/stat; echo "P $pid" >&2
     exec socat -d -d -t 86400 -b 262144 STDIO "TCP:$a,connect-timeout=$T")
  else
    exec 4<&0
    nc -w "$T" "$1" "$2" <&4 4<&- &
    echo "P $!" >&2
    watch $!
    wait $!
  fi
  echo "X $?" >&2
  exec cat >/dev/null
}
[ -n "$fifo" ] && [ -n "$4" ] && prime "$2" "$3" "$4"
echo "R $mode${fifo:+ primed}" >&2
while read -r op host port nonce key; do
  [ "$op" = C ] || die
  if [ -n "$fifo" ]; then
    p="$f-$key"
    { read -r sp <"$p.pid" && kill -0 "$sp"; } 2>/dev/null || prime "$host" "$port" "$key"
    read -r sp <"$p.pid"
    echo "P $sp" >&2
    exec 5>"$p" 6<"$p"
    frames >&5
    exec 5>&- 6<&-
    wait "$sp"
    echo "X $?" >&2
    echo D >&2
    prime "$host" "$port" "$key"
  else
    frames | relay "$host" "$port"
    echo D >&2
  fi
done
die
