"""docs/benchmarks.md, "The CPU a request spends around the model (issue 20)": what a broker costs at the least.

The issue asks that on a fused plan (one worker process does all the work) the broker's part be "close to a
ZeroMQ proxy's". This measures that floor on this machine, with a request's real frames: the CPU per request of
a process that only forwards, at a given rate, in two forms:

* ``c-proxy``: ``zmq.proxy(ROUTER, DEALER)``, libzmq's own forwarding loop in C (no Python per message);
* ``py-forward``: the least a Python broker can do: one ``zmq.Poller`` loop, ``recv_multipart(copy=False)`` on
  one side and ``send_multipart(copy=False)`` on the other, nothing decoded.

Around it, in their own processes: a client (one DEALER socket, tcp on loopback, requests sent at a fixed
pace, as jizhi's load generator sends them: a msgpack header and the 500 candidates' item ids and recall
scores, about 6 KB) and a worker (one DEALER socket, ipc, answering each request at once with a reply of
top-10's size). The forwarder's CPU is utime + stime from /proc/<pid>/stat over the measured window, divided by
the replies the client received; the client's and the worker's CPU likewise.

    python docs/run-proxy-floor.py [--rate 650] [--duration 20] [--candidates 500]

Prints one line per form: requests answered, the forwarder's, the worker's and the client's us per request.
"""
import argparse
import multiprocessing as mp
import os
import tempfile
import time

import msgpack
import numpy as np
import zmq

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def forwarder(kind, front, back):
    ctx = zmq.Context()
    f, b = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    f.bind(front)
    b.bind(back)
    if kind == "c-proxy":
        try:
            zmq.proxy(f, b)
        except zmq.ContextTerminated:
            return
    poller = zmq.Poller()
    poller.register(f, zmq.POLLIN)
    poller.register(b, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            if sock is f:
                b.send_multipart(f.recv_multipart(copy=False), copy=False)
            else:
                f.send_multipart(b.recv_multipart(copy=False), copy=False)


def worker(back, reply_bytes):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(back)
    reply = msgpack.packb({"status": "ok", "order": list(range(10)), "scores": [0.5] * 10}) + b"\0" * reply_bytes
    while True:
        frames = s.recv_multipart(copy=False)
        # frames: [client routing id, empty delimiter?, header, arrays...]: answer to the routing id
        s.send_multipart([frames[0], reply], copy=False)


def client(front, rate, duration, candidates, out):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(front)
    rng = np.random.default_rng(1)
    header = msgpack.packb({"v": 1, "op": "score", "user": 7, "pipeline": "p", "top_k": 10,
                            "arrays": [["item_ids", "uint64", candidates], ["recall_scores", "float32", candidates]]})
    items = rng.integers(0, 1 << 40, candidates).astype("<u8").tobytes()
    recall = rng.random(candidates).astype("<f4").tobytes()
    time.sleep(0.5)
    got = sent = 0
    poller = zmq.Poller()
    poller.register(s, zmq.POLLIN)
    start = time.monotonic()
    end = start + duration
    while True:
        now = time.monotonic()
        due = int((now - start) * rate) if now < end else sent
        while sent < due:
            s.send_multipart([header, items, recall], copy=False)
            sent += 1
        if now >= end and got >= sent:
            break
        if now >= end + 2.0:
            break
        for _ in poller.poll(timeout=1):
            while True:
                try:
                    s.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                got += 1
    out.put((sent, got, cpu_s(os.getpid())))


def measure(kind, rate, duration, candidates):
    d = tempfile.mkdtemp(prefix="jizhi-proxyfloor-")
    front, back = "tcp://127.0.0.1:5598", f"ipc://{d}/back"
    ctx = mp.get_context("spawn")
    fw = ctx.Process(target=forwarder, args=(kind, front, back), daemon=True)
    wk = ctx.Process(target=worker, args=(back, 0), daemon=True)
    fw.start()
    wk.start()
    time.sleep(1.0)
    q = ctx.Queue()
    cl = ctx.Process(target=client, args=(front, rate, duration, candidates, q), daemon=True)
    f0, w0 = cpu_s(fw.pid), cpu_s(wk.pid)
    cl.start()
    sent, got, client_s = q.get(timeout=duration + 30)
    f1, w1 = cpu_s(fw.pid), cpu_s(wk.pid)
    cl.join(5)
    for p in (fw, wk):
        p.kill()
        p.join(5)
    try:
        os.unlink(f"{d}/back")
    except OSError:
        pass
    os.rmdir(d)
    per = 1e6 / max(got, 1)
    return {"kind": kind, "sent": sent, "answered": got, "forwarder_us": (f1 - f0) * per,
            "worker_us": (w1 - w0) * per, "client_us": client_s * per}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=650.0, help="requests per second (default: the DLRM's max)")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--candidates", type=int, default=500)
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {os.cpu_count()} cores, {args.rate:g} "
          f"requests/s for {args.duration:g} s, {args.candidates} candidates (CPU from /proc, 1/{TICK} s ticks)")
    for kind in ("c-proxy", "py-forward"):
        r = measure(kind, args.rate, args.duration, args.candidates)
        print(f"{kind:>10}: {r['answered']:,} of {r['sent']:,} answered; us per request: forwarder "
              f"{r['forwarder_us']:.0f}, worker {r['worker_us']:.0f}, client {r['client_us']:.0f}", flush=True)


if __name__ == "__main__":
    main()
