"""Restore bandwidth with and without the daemon's checksum check (verify_on_restore).

    .venv/bin/python bench/restore_verify.py

Prints, per setting, the median of 7 ``restore(into=state)`` of a ~1 GiB state
against the median of 7 torch ``copy_`` of the same bytes (the memcpy floor).
"""
import os, subprocess, sys, time, statistics, torch
import shardguard.client as sg
def run(verify):
    sock=f"/tmp/sg-rv-{verify}.sock"
    p=subprocess.Popen([sys.executable,"-m","shardguard.daemon","--socket",sock,"--shm-prefix",f"shardguard-rv{verify}","--verify-on-restore",verify,"--log-level","WARNING"])
    try:
        while not os.path.exists(sock): time.sleep(0.05)
        time.sleep(0.3)
        g=torch.Generator().manual_seed(0)
        state={f"t{i}": torch.randn(n, generator=g) for i,n in enumerate([64<<20, 64<<20, 32<<20, 32<<20, 16<<20, 16<<20, 8<<20, 8<<20, 4<<20, 4<<20]+[1<<18]*16)}
        nbytes=sum(t.numel()*4 for t in state.values())
        with sg.connect(sock,"rv") as c:
            c.snapshot(0,state).wait()
            into={k: torch.empty_like(v) for k,v in state.items()}
            for v in into.values(): v.zero_()
            ts=[]
            for _ in range(7):
                t=time.perf_counter(); c.restore(into=into); ts.append(time.perf_counter()-t)
            dst=torch.empty(nbytes//4); src=torch.randn(nbytes//4); ms=[]
            for _ in range(7):
                t=time.perf_counter(); dst.copy_(src); ms.append(time.perf_counter()-t)
        m=statistics.median(ts); f=statistics.median(ms)
        print(f"verify={verify}: {nbytes/2**30:.2f} GiB restore(into) median {m*1e3:.1f} ms = {nbytes/m/1e9:.1f} GB/s; memcpy {f*1e3:.1f} ms; ratio {f/m:.2f}x", flush=True)
    finally:
        p.terminate(); p.wait()
        subprocess.run(f"rm -f /dev/shm/shardguard-rv{verify}*", shell=True)
run("true"); run("false"); run("true"); run("false")
