#!/usr/bin/env python3
"""3 trackers, a client logged in; every tracker killed at once (SIGKILL); trackers 1 and 2
restarted at once, tracker 3 GAP seconds later. Then the client's next commands (retried while
no tracker serves): is it still logged in (its session kept)?
Usage: restart_all_session.py BIN_DIR GAP"""
import os, select, signal, socket, subprocess, sys, tempfile, time
bindir, gap = sys.argv[1], float(sys.argv[2])
def free_ports(k):
    ss=[socket.socket() for _ in range(k)]
    for s in ss: s.bind(("127.0.0.1",0))
    ps=[s.getsockname()[1] for s in ss]
    for s in ss: s.close()
    return ps
def readline(proc, deadline):
    buf=b""
    while time.monotonic()<deadline:
        r,_,_=select.select([proc.stdout],[],[],max(0,deadline-time.monotonic()))
        if not r: break
        ch=os.read(proc.stdout.fileno(),1)
        if not ch: return None
        if ch==b"\n": return buf.decode()
        buf+=ch
    return None
tmp=tempfile.TemporaryDirectory(); d=tmp.name
env=dict(os.environ, XDG_STATE_HOME=os.path.join(d,"state"))
ports=free_ports(3)
info=os.path.join(d,"info.txt")
open(info,"w").write("".join(f"127.0.0.1:{p}\n" for p in ports))
procs=[]
def tracker(no):
    log=open(os.path.join(d,f"t{no}.log"),"a")
    t=subprocess.Popen([f"{bindir}/tracker_program","--data-dir",os.path.join(d,f"d{no}"),info,str(no)],stdin=subprocess.PIPE,stdout=subprocess.DEVNULL,stderr=log,env=env)
    procs.append(t); return t
try:
    ts=[tracker(n) for n in (1,2,3)]
    time.sleep(1.0)
    errf=os.path.join(d,"c.err")
    c=subprocess.Popen([f"{bindir}/client_program","--state-dir",os.path.join(d,"c"),"127.0.0.1:0",info],stdin=subprocess.PIPE,stdout=subprocess.PIPE,stderr=open(errf,"w"),env=env,cwd=d)
    procs.append(c)
    def cmd(line, timeout=30):
        c.stdin.write((line+"\n").encode()); c.stdin.flush()
        return readline(c, time.monotonic()+timeout)
    print("create_user:", cmd("create_user u pw"))
    print("login:", cmd("login u pw"))
    print("create_group:", cmd("create_group g0"))
    time.sleep(0.5)
    for t in ts: t.kill()
    for t in ts: t.wait()
    t0=time.monotonic()
    time.sleep(0.3)
    tracker(1); tracker(2)
    time.sleep(gap)
    tracker(3)
    out=None
    for i in range(20):
        c.stdin.write(f"create_group g{i+1}\n".encode()); c.stdin.flush()
        out=readline(c, time.monotonic()+2)
        if out: break
        time.sleep(0.5)
    print(f"after restarting tracker 3 {gap:.1f} s later: stdout {out!r} at attempt {i+1}, {time.monotonic()-t0:.1f} s after the kill")
    time.sleep(0.3)
    print("client stderr:"); print(open(errf).read())
    print("load", open("/proc/loadavg").read().split()[0])
finally:
    for p in procs:
        try: p.kill(); p.wait(timeout=10)
        except Exception: pass
    tmp.cleanup()
