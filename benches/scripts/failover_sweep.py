#!/usr/bin/env python3
"""Failover timing with real processes: 3 trackers, a client logged in and sharing; freeze
(SIGSTOP) or kill (SIGKILL) its tracker (and optionally the next), then time from the signal
to the answer of the client's next command. Every process is thawed and killed at the end of
each run; everything lives in a temporary directory (XDG_STATE_HOME, --data-dir, --state-dir).
Usage: failover_sweep.py BIN_DIR stop|kill N_VICTIMS RUNS [ORDER, e.g. 231]"""
import os, random, select, signal, socket, subprocess, sys, tempfile, time

bindir, mode, nvict, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# The client's file order (tracker numbers); its first N_VICTIMS are frozen or killed.
order = [int(ch) for ch in (sys.argv[5] if len(sys.argv) > 5 else "123")]

def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports

def readline(proc, deadline):
    """The next line the client prints on stdout or stderr (its `error: ` lines go to stderr,
    beside its log lines), or None at the deadline or the end of both."""
    bufs = proc.__dict__.setdefault("_bufs", {proc.stdout.fileno(): b"", proc.stderr.fileno(): b""})
    while time.monotonic() < deadline:
        for fd, buf in bufs.items():
            if b"\n" in buf:
                line, bufs[fd] = buf.split(b"\n", 1)
                return line.decode(errors="replace")
        r, _, _ = select.select(list(bufs), [], [], max(0, deadline - time.monotonic()))
        if not r:
            break
        for fd in r:
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            bufs[fd] += chunk
    return None

def cmd(client, line, want, timeout=30):
    client.stdin.write((line + "\n").encode()); client.stdin.flush()
    deadline = time.monotonic() + timeout
    while True:
        out = readline(client, deadline)
        if out is None:
            return None
        if want in out or out.startswith("error"):
            return out

def one_run(k):
    tmp = tempfile.TemporaryDirectory()
    d = tmp.name
    env = dict(os.environ, XDG_STATE_HOME=os.path.join(d, "state"))
    ports = free_ports(4)
    info = os.path.join(d, "info.txt")
    with open(info, "w") as f:
        for p in ports[:3]:
            f.write(f"127.0.0.1:{p}\n")
    cinfo = os.path.join(d, "client.txt")
    with open(cinfo, "w") as f:
        for no in order:
            f.write(f"127.0.0.1:{ports[no - 1]}\n")
    trackers = []
    procs = []
    try:
        for no in (1, 2, 3):
            log = open(os.path.join(d, f"t{no}.log"), "w")
            t = subprocess.Popen([f"{bindir}/tracker_program", "--data-dir", os.path.join(d, f"d{no}"), info, str(no)],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, env=env)
            trackers.append(t); procs.append(t)
        with open(os.path.join(d, "f.bin"), "wb") as f:
            f.write(os.urandom(200_000))
        c = subprocess.Popen([f"{bindir}/client_program", "--state-dir", os.path.join(d, "c"), f"127.0.0.1:{ports[3]}", cinfo],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=d)
        procs.append(c)
        for _ in range(100):
            out = cmd(c, "create_user u pw", "created")
            if out and "created" in out:
                break
            time.sleep(0.1)
        assert "logged in" in (cmd(c, "login u pw", "logged in") or ""), "login"
        assert "created" in (cmd(c, "create_group g0", "created") or ""), "group"
        out = cmd(c, "upload_file f.bin g0", "f.bin")
        assert out and not out.startswith("error"), out
        # A random phase against the client's pings.
        time.sleep(0.5 + random.random() * 0.6)
        victims = [trackers[no - 1] for no in order[:nvict]]
        sig = signal.SIGSTOP if mode == "stop" else signal.SIGKILL
        t0 = time.monotonic()
        for v in victims:
            v.send_signal(sig)
        out = cmd(c, "create_group g1", "g1", timeout=60)
        took = time.monotonic() - t0
        return took, out
    finally:
        for p in procs:
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait(timeout=10)
            except Exception:
                pass
        tmp.cleanup()

res = []
for k in range(runs):
    took, out = one_run(k)
    res.append(took)
    print(f"run {k+1}: {took:.3f} s  {out!r}  load {open('/proc/loadavg').read().split()[0]}", flush=True)
res.sort()
print(f"{bindir} {mode} x{nvict} order {order}: min {res[0]:.2f} median {res[len(res)//2]:.2f} max {res[-1]:.2f}")
