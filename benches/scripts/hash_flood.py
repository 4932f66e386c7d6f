#!/usr/bin/env python3
"""False failovers under password hashing: 3 trackers; a client logged in on tracker 1 sits idle
(logging at info) while FLOODERS other clients, whose files list tracker 1 only, create users
back to back (an Argon2 hash each on tracker 1's two password threads) for SECS seconds. Counts
the idle client's 'silent for' warnings and moves. Usage: hash_flood.py BIN_DIR FLOODERS SECS"""
import os, signal, socket, subprocess, sys, tempfile, time

bindir, nflood, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports

tmp = tempfile.TemporaryDirectory()
d = tmp.name
env = dict(os.environ, XDG_STATE_HOME=os.path.join(d, "state"))
ports = free_ports(4 + nflood)
info = os.path.join(d, "info.txt")
with open(info, "w") as f:
    for p in ports[:3]:
        f.write(f"127.0.0.1:{p}\n")
info1 = os.path.join(d, "info1.txt")
with open(info1, "w") as f:
    f.write(f"127.0.0.1:{ports[0]}\n")
procs = []
try:
    for no in (1, 2, 3):
        log = open(os.path.join(d, f"t{no}.log"), "w")
        procs.append(subprocess.Popen([f"{bindir}/tracker_program", "--data-dir", os.path.join(d, f"d{no}"), info, str(no)],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, env=env))
    clog_path = os.path.join(d, "idle.log")
    idle = subprocess.Popen([f"{bindir}/client_program", "--log-level", "info", "--state-dir", os.path.join(d, "c"),
                             f"127.0.0.1:{ports[3]}", info], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(clog_path, "w"), env=env)
    procs.append(idle)
    time.sleep(3)  # the trackers start serving (a benchmark script, not a test)
    idle.stdin.write(b"create_user idle pw\nlogin idle pw\n"); idle.stdin.flush()
    for _ in range(2):
        print("idle:", idle.stdout.readline().decode().strip())
    flooders = []
    for i in range(nflood):
        text = "".join(f"create_user f{i}_{k} pw\n" for k in range(20000)).encode()
        fl = subprocess.Popen([f"{bindir}/client_program", "--state-dir", os.path.join(d, f"f{i}"),
                               f"127.0.0.1:{ports[4 + i]}", info1], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        procs.append(fl); flooders.append(fl)
        fl.stdin.write(text); fl.stdin.flush()
    t0 = time.monotonic()
    loads = []
    while time.monotonic() - t0 < secs:
        time.sleep(1)
        loads.append(open("/proc/loadavg").read().split()[0])
    for fl in flooders:
        fl.kill()
    created = 0
    for fl in flooders:
        out = fl.stdout.read().decode()
        created += out.count("created")
    idle.stdin.write(b"list_groups\n"); idle.stdin.flush()
    log = open(clog_path).read()
    t1log = open(os.path.join(d, "t1.log")).read()
    print(f"{bindir}: {nflood} flooders for {secs:.0f} s: {created} users created "
          f"({created/secs:.0f}/s); idle client: {log.count('silent for')} 'silent for', "
          f"{log.count('moved to tracker')} moves, {log.count('was away')} 'was away'; "
          f"tracker 1 stalls: {t1log.count('stall')}; load {loads[0]}..{loads[-1]}")
finally:
    for p in procs:
        try:
            p.send_signal(signal.SIGCONT); p.kill(); p.wait(timeout=10)
        except Exception:
            pass
    tmp.cleanup()
