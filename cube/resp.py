"""RESP, Redis's wire protocol: a small client for single commands, and the batch codec of the cube's reads.

The batch codec (Numba kernels, compiled at import) writes a pipeline of
MGET or MSET commands straight from key and value rows, and parses MGET
replies straight into the output rows, resuming wherever a ``recv`` left off:
no Python object per key (cube/redis.py reads with it, cube/push.py writes).
Everything else (CLUSTER SLOTS, GET of a layout record, SCAN, a reshard's
rare per-key path) goes through ``call`` and ``pipeline``, plain Python, a
connection each.
"""
import numpy as np
from numba import njit

# Redis runs one command at a time: a MGET of tens of thousands of keys would hold a shard (and every
# request waiting on it) for tens of milliseconds, so a command carries at most this many keys; the
# commands of a pipeline interleave with other clients'.
MAX_KEYS_PER_COMMAND = 1024
# the verbs encode_commands writes, as RESP bulk strings
MGET = np.frombuffer(b"$4\r\nMGET\r\n", dtype=np.uint8)
MSET = np.frombuffer(b"$4\r\nMSET\r\n", dtype=np.uint8)

# --- the batch codec: MGET/MSET pipelines and MGET replies (Numba) -----------


@njit(cache=True, nogil=True)
def _put_int(out, p, v):
    if v == 0:
        out[p] = 48
        return p + 1
    d = 0
    w = v
    while w > 0:
        w //= 10
        d += 1
    for i in range(d):
        out[p + d - 1 - i] = 48 + v % 10
        v //= 10
    return p + d


@njit(cache=True, nogil=True)
def _put(out, p, src):
    for i in range(src.shape[0]):
        out[p + i] = src[i]
    return p + src.shape[0]


@njit(cache=True, nogil=True)
def encode_commands(keyb, vals, order, starts, khdr, vhdr, verb, out):
    # One command per group g (keys order[starts[g]:starts[g+1]]): MGET k.. or, with vals, MSET k v ...
    p = 0
    per = 2 if vals.shape[0] else 1
    for g in range(starts.shape[0] - 1):
        n = starts[g + 1] - starts[g]
        out[p] = 42                                # *
        p = _put_int(out, p + 1, per * n + 1)
        out[p] = 13
        out[p + 1] = 10
        p = _put(out, p + 2, verb)                 # $4\r\nMGET\r\n
        for e in range(starts[g], starts[g + 1]):
            k = order[e]
            p = _put(out, p, khdr)
            p = _put(out, p, keyb[k])
            out[p] = 13
            out[p + 1] = 10
            p += 2
            if per == 2:
                p = _put(out, p, vhdr)
                p = _put(out, p, vals[k])
                out[p] = 13
                out[p + 1] = 10
                p += 2
    return p


@njit(cache=True, nogil=True)
def _read_int(buf, p, n):
    neg = False
    if p < n and buf[p] == 45:
        neg = True
        p += 1
    v = 0
    while p < n and buf[p] != 13:
        v = v * 10 + (buf[p] - 48)
        p += 1
    if p + 1 >= n:
        return 0, -1
    return (-v if neg else v), p + 2


@njit(cache=True, nogil=True)
def parse_mget(buf, n, state, starts, order, rows, found, status, errat):
    # Parses MGET replies from buf[state[0]:n], writing values into rows[key] and status[key]:
    # 1 answered (found or absent), 2 MOVED/ASK, 3 another error or a value of the wrong length.
    # state = [pos, cmd, elem]: where parsing resumes (elem < 0: at the start of command cmd's reply,
    # else at element elem of its array), updated in place. errat[cmd]: where an error reply's line
    # starts (for the caller to read MOVED targets). Returns False on a protocol error.
    rb = rows.shape[1]
    C = starts.shape[0] - 1
    pos, cmd, elem = state[0], state[1], state[2]
    while cmd < C:
        p = pos
        if p >= n:
            break
        k0 = starts[cmd]
        k1 = starts[cmd + 1]
        if elem < 0:
            t = buf[p]
            if t == 42:                             # *m: m bulk strings follow
                m, p = _read_int(buf, p + 1, n)
                if p < 0:
                    break
                if m != k1 - k0:
                    return False
                pos = p
                elem = 0
            elif t == 45 or t == 43:                # -ERR ... (or an unexpected +OK)
                q = p
                while q < n and buf[q] != 13:
                    q += 1
                if q + 1 >= n:
                    break
                redirect = t == 45 and ((buf[p + 1] == 77 and buf[p + 2] == 79) or
                                        (buf[p + 1] == 65 and buf[p + 2] == 83))
                for e in range(k0, k1):
                    status[order[e]] = 2 if redirect else 3
                if t == 45:
                    errat[cmd] = p
                pos = q + 2
                cmd += 1
                continue
            else:
                return False
        while elem < k1 - k0:                       # the array's elements, each whole or not at all
            p = pos
            if p >= n:
                break
            if buf[p] != 36:
                return False
            ln, p = _read_int(buf, p + 1, n)
            if p < 0:
                break
            key = order[k0 + elem]
            if ln >= 0:
                if p + ln + 2 > n:
                    break
                if ln == rb:
                    rows[key, :] = buf[p:p + rb]
                    found[key] = True
                    status[key] = 1
                else:
                    status[key] = 3
                p += ln + 2
            else:
                status[key] = 1
            pos = p
            elem += 1
        if elem < k1 - k0:
            break
        elem = -1
        cmd += 1
    state[0] = pos
    state[1] = cmd
    state[2] = elem
    return True


def command_starts(s, per_command=MAX_KEYS_PER_COMMAND):
    """Boundaries of the MGETs of keys sorted by slot ``s``: a new command at every slot change
    and every ``per_command`` keys within a slot. int64 [C + 1]."""
    n = s.shape[0]
    first = np.concatenate(([0], np.flatnonzero(np.diff(s)) + 1)).astype(np.int64)
    run = np.repeat(first, np.diff(np.concatenate((first, [n]))))          # each key's slot-run start
    rank = np.arange(n, dtype=np.int64) - run
    cuts = np.flatnonzero(rank % per_command == 0)
    return np.concatenate((cuts, [n])).astype(np.int64)


# --- the small RESP client for everything that is not the batch read: cube/connect.py (no Numba there: the
# supervisor checks credentials with it)
from jizhi.cube.connect import Reader, RedisError, call, encode_command, pipeline  # noqa: E402,F401


def _compile():
    """Compile the kernels at import (from Numba's on-disk cache when present), not inside a lookup's budget."""
    keyb = np.zeros((1, 10), dtype=np.uint8)
    order, starts = np.zeros(1, np.int64), np.array([0, 1], np.int64)
    buf = np.empty(256, dtype=np.uint8)
    khdr = np.frombuffer(b"$10\r\n", dtype=np.uint8)
    encode_commands(keyb, np.empty((0, 0), np.uint8), order, starts, khdr, khdr[:0], MGET, buf)
    encode_commands(keyb, np.zeros((1, 4), np.uint8), order, starts, khdr, khdr, MSET, buf)
    reply = np.frombuffer(b"*1\r\n$4\r\nabcd\r\n", dtype=np.uint8).copy()
    parse_mget(reply, reply.shape[0], np.array([0, 0, -1], np.int64), starts, order, np.zeros((1, 4), np.uint8),
               np.zeros(1, bool), np.zeros(1, np.uint8), np.full(1, -1, np.int64))


_compile()
