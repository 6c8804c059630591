"""A local Redis Cluster for development and tests: ``jizhi-redis-cluster`` (bin/).

Debian's ``redis-server`` (or Valkey's, which speaks the same protocol), 3
masters with 1 replica each by default, on loopback ports ``base_port ..
base_port + 5``, each node in its own directory under ``DIR`` (its
``redis.conf``, ``nodes.conf``, log and pid file)::

    jizhi-redis-cluster init  DIR [--base-port 7000] [--masters 3] [--replicas 1]
    jizhi-redis-cluster start DIR      # start the nodes, join them into one cluster (once), wait for "ok"
    jizhi-redis-cluster status DIR
    jizhi-redis-cluster stop DIR

``init`` only writes the node configurations; the systemd units in
``etc/systemd/`` (``jizhi-redis@.service`` per node, one-shot
``jizhi-redis-cluster.service`` to join them) run the same nodes under
systemd. Nothing listens on anything but 127.0.0.1 (or, with ``--netns``, the
nodes' own private addresses). Persistence is off
(``save ""``, ``appendonly no``): the cube is pushed again after a restart of
the whole cluster, while a single node restarted rejoins from its replica.

With ``--netns`` (root, iproute2) every node runs as a separate host: its own
network namespace with a veth link to a bridge in the caller's namespace,
address ``10.231.<K>.<10 + i>`` (K from the base port), so node-to-node and
client-to-node traffic crosses a real network stack and link, not loopback.
``stop`` removes the namespaces and the bridge. Names and addresses derive
from the base port (``base_port % 250``): two namespaced clusters need base
ports that differ modulo 250. On a host whose firewall drops bridged
traffic (Docker's FORWARD policy with br_netfilter), allow the bridge
``jzbr<K>`` first.

The tests use ``LocalCluster`` directly (start, stop, kill a master, wait for
the failover).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from jizhi.cube.cluster import slot_map
from jizhi.cube.resp import RedisError, call

CONF = """# written by jizhi-redis-cluster init; one node of a local cluster
port {port}
bind {host}
protected-mode {protected}
cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout {node_timeout_ms}
cluster-require-full-coverage no
cluster-allow-reads-when-down no
dir {dir}
logfile {dir}/redis.log
pidfile {dir}/redis.pid
save ""
appendonly no
maxmemory-policy noeviction
"""


def _binary(*names):
    """The first of ``names`` on PATH or in /usr/bin, else None."""
    for name in names:
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if path:
            return path
    return None


def server_binary():
    """The redis-server (or valkey-server), else None."""
    return _binary("redis-server", "valkey-server")


def cli_binary():
    return _binary("redis-cli", "valkey-cli")


def command(port, *args, timeout_s=2.0, host="127.0.0.1", access=None):
    """One command to one node; the decoded reply (cube/resp.py's small RESP reader; ``access``: TLS and AUTH,
    cube/connect.py)."""
    return call(host, port, list(args), timeout_s=timeout_s, access=access)


def make_certificates(directory, names=("127.0.0.1", "localhost")):
    """A CA and a node certificate signed by it (``openssl``): ``{ca, cert, key}`` paths under ``directory``;
    the node's certificate names ``names`` (IP addresses and DNS names)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "node.crt").exists():
        sans = ",".join(("IP:" if n.replace(".", "").isdigit() or ":" in n else "DNS:") + n for n in names)
        (d / "ext.cnf").write_text(f"subjectAltName={sans}\n")
        for argv in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
                      "-days", "2", "-subj", "/CN=jizhi-test-ca"],
                     ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr", "-subj",
                      f"/CN={names[0]}"],
                     ["x509", "-req", "-in", "node.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                      "-out", "node.crt", "-days", "2", "-extfile", "ext.cnf"]):
            subprocess.run(["openssl", *argv], cwd=d, check=True, capture_output=True, timeout=60)
    return {"ca": str(d / "ca.crt"), "cert": str(d / "node.crt"), "key": str(d / "node.key")}


class LocalCluster:
    """``masters`` x (1 + ``replicas``) redis-server processes on 127.0.0.1 (or separate namespaces), one directory each."""

    def __init__(self, root, base_port=7000, masters=3, replicas=1, node_timeout_ms=2000, netns=False,
                 password=None, user=None, tls=None, announce_hostname=None):
        """For the clusters teams run (tests of cube/connect.py): ``password`` (``requirepass``, or with ``user``
        an ACL user and the default user off), ``tls`` (``make_certificates``: every port TLS only, the bus
        too), ``announce_hostname`` (a format of ``{port}``: the name each node announces instead of its
        address, which a client must map)."""
        self.password, self.user, self.tls, self.announce_hostname = password, user, tls, announce_hostname
        self.root = Path(root)
        self.base_port = int(base_port)
        self.masters = int(masters)
        self.replicas = int(replicas)
        self.node_timeout_ms = int(node_timeout_ms)
        self.netns = bool(netns)
        meta = self.root / "cluster.json"
        if meta.exists():
            m = json.loads(meta.read_text())
            self.base_port, self.masters, self.replicas = m["base_port"], m["masters"], m["replicas"]
            self.node_timeout_ms, self.netns = m["node_timeout_ms"], m.get("netns", False)

    # -- hosts: loopback, or one network namespace per node --

    @property
    def _net(self):
        return self.base_port % 250 + 1

    def host(self, port):
        if not self.netns:
            return "127.0.0.1"
        return f"10.231.{self._net}.{10 + port - self.base_port}"

    def _ns(self, port):
        return f"jzr{self._net}n{port - self.base_port}"

    def _bridge(self):
        return f"jzbr{self._net}"

    def _ip(self, *args, ns=None, check=True):
        cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
        return r

    def _make_hosts(self):
        """The bridge and one namespace + veth per node (idempotent)."""
        br = self._bridge()
        if self._ip("link", "show", br, check=False).returncode:
            self._ip("link", "add", br, "type", "bridge")
            self._ip("addr", "add", f"10.231.{self._net}.1/24", "dev", br)
            self._ip("link", "set", br, "up")
        for port in self.ports:
            ns, veth = self._ns(port), f"jzv{self._net}n{port - self.base_port}"
            if self._ip("link", "show", veth, check=False).returncode == 0:
                continue
            self._ip("netns", "add", ns, check=False)
            self._ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip("link", "set", veth, "master", br)
            self._ip("link", "set", veth, "up")
            self._ip("addr", "add", f"{self.host(port)}/24", "dev", "eth0", ns=ns)
            self._ip("link", "set", "eth0", "up", ns=ns)
            self._ip("link", "set", "lo", "up", ns=ns)

    def _remove_hosts(self):
        for port in self.ports:
            self._ip("netns", "del", self._ns(port), check=False)
        self._ip("link", "del", self._bridge(), check=False)

    @property
    def ports(self):
        return [self.base_port + i for i in range(self.masters * (1 + self.replicas))]

    @property
    def url(self):
        """The seed list a jizhi cube URL starts with: ``redis://HOST1:P1,HOST2:P2,...`` (``rediss://`` and
        the credentials when the cluster has them)."""
        cred = ""
        if self.password is not None:
            cred = f"{self.user or ''}:{self.password}@"
        return ("rediss://" if self.tls else "redis://") + cred + ",".join(f"{self.host(p)}:{p}" for p in self.ports)

    def options(self):
        """The URL options a client of this cluster needs (the CA of a TLS cluster, the map of announced
        names), as ``?k=v&...`` or ""."""
        opts = []
        if self.tls:
            opts.append(f"tls_ca={self.tls['ca']}")
        if self.announce_hostname:
            opts.append("map=" + ",".join(f"{self.announce_hostname.format(port=p)}={self.host(p)}"
                                          for p in self.ports))
        return ("?" + "&".join(opts)) if opts else ""

    @property
    def access(self):
        from jizhi.cube.connect import Access
        return Access(self.url + self.options()) if (self.password or self.tls or self.announce_hostname) else None

    def _conf_extra(self, port):
        lines = []
        if self.password is not None and self.user:
            lines += [f"user {self.user} on >{self.password} ~* &* +@all", "user default off",
                      f"masteruser {self.user}", f"masterauth {self.password}"]
        elif self.password is not None:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if self.tls:
            lines += ["port 0", f"tls-port {port}", f"tls-cert-file {self.tls['cert']}",
                      f"tls-key-file {self.tls['key']}", f"tls-ca-cert-file {self.tls['ca']}", "tls-cluster yes",
                      "tls-replication yes", "tls-auth-clients no"]
        if self.announce_hostname:
            lines += [f"cluster-announce-hostname {self.announce_hostname.format(port=port)}",
                      "cluster-preferred-endpoint-type hostname"]
        return "\n".join(lines) + "\n"

    def cli_args(self):
        """redis-cli's options for this cluster's credentials and TLS."""
        args = []
        if self.password is not None:
            args += (["--user", self.user, "--pass", self.password] if self.user else ["-a", self.password])
            args.append("--no-auth-warning")
        if self.tls:
            args += ["--tls", "--cacert", self.tls["ca"]]
        return args

    def node_dir(self, port):
        return self.root / str(port)

    def init(self):
        if server_binary() is None:
            raise RuntimeError("redis-server not found: install Debian's redis-server (apt-get install redis-server)")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "cluster.json").write_text(json.dumps(
            {"base_port": self.base_port, "masters": self.masters, "replicas": self.replicas,
             "node_timeout_ms": self.node_timeout_ms, "netns": self.netns}))
        for port in self.ports:
            d = self.node_dir(port)
            d.mkdir(exist_ok=True)
            # protected mode refuses every client not on loopback: off only for the namespaced hosts,
            # whose addresses exist only on this machine's private bridge
            (d / "redis.conf").write_text(CONF.format(port=port, dir=d.resolve(), host=self.host(port),
                                                      protected="no" if self.netns else "yes",
                                                      node_timeout_ms=self.node_timeout_ms) + self._conf_extra(port))

    def pid(self, port):
        try:
            pid = int((self.node_dir(port) / "redis.pid").read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def alive(self, port):
        try:
            return command(port, "PING", timeout_s=0.5, host=self.host(port), access=self.access) == "PONG"
        except (OSError, RedisError):
            return False

    def start_node(self, port):
        if self.alive(port):
            return
        d = self.node_dir(port)
        argv = [server_binary(), str(d / "redis.conf"), "--daemonize", "yes"]
        if self.netns:
            self._make_hosts()
            argv = ["ip", "netns", "exec", self._ns(port)] + argv
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while not self.alive(port):
            if time.monotonic() > end:
                raise RuntimeError(f"redis-server on port {port} did not answer in 10 s; see {d / 'redis.log'}")
            time.sleep(0.05)

    def start(self, timeout_s=60.0):
        """Start every node; join them into a cluster the first time; wait until the cluster says ok."""
        if not (self.root / "cluster.json").exists():
            self.init()
        for port in self.ports:
            self.start_node(port)
        info = self.cluster_info(self.ports[0])
        if info.get("cluster_known_nodes", "1") == "1" and info.get("cluster_slots_assigned", "0") == "0":
            self.create()
        self.wait_ok(timeout_s)

    def create(self):
        """Join the nodes: ``redis-cli --cluster create`` (masters first, then their replicas)."""
        cli = cli_binary()
        if cli is None:
            raise RuntimeError("redis-cli not found (Debian's redis-tools)")
        args = [cli, *self.cli_args(), "--cluster", "create", *[f"{self.host(p)}:{p}" for p in self.ports],
                "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        r = subprocess.run(args, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {r.stdout[-800:]} {r.stderr[-800:]}")

    def cluster_info(self, port):
        text = command(port, "CLUSTER", "INFO", host=self.host(port), access=self.access)
        text = text.decode() if isinstance(text, bytes) else text
        return dict(line.split(":", 1) for line in text.split("\r\n") if ":" in line)

    def wait_ok(self, timeout_s=60.0, ports=None):
        """Until every live node (of ``ports``) reports cluster_state:ok with all slots served."""
        end = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < end:
            try:
                infos = [self.cluster_info(p) for p in (ports or self.ports) if self.pid(p)]
                if infos and all(i.get("cluster_state") == "ok" and i.get("cluster_slots_ok") == "16384"
                                 for i in infos):
                    # and every node agrees which masters serve the slots, each with its replicas attached
                    if len({str(self.masters_of(p)) for p in (ports or self.ports) if self.pid(p)}) == 1 \
                            and (ports is not None or self._replicas_attached()):
                        return
                last = infos
            except (OSError, RedisError) as e:     # a node still loading, or not up yet
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"cluster under {self.root} not ok in {timeout_s:g} s: {last}")

    def _replicas_attached(self):
        """Every slot range lists ``replicas`` replicas (CLUSTER SLOTS): a client can read from them."""
        if not self.replicas or not all(self.pid(p) for p in self.ports):
            return True          # (a node down: its range has a replica fewer until it is back)
        port = next(p for p in self.ports if self.pid(p))
        reply = command(port, "CLUSTER", "SLOTS", host=self.host(port), access=self.access)
        return all(len(entry) - 3 >= self.replicas for entry in reply)

    def masters_of(self, port):
        """Sorted ports of the masters serving slots, as ``port`` sees them."""
        _, nodes = slot_map(command(port, "CLUSTER", "SLOTS", host=self.host(port), access=self.access))
        return sorted(p for _, p in nodes)

    def kill(self, port, sig=signal.SIGKILL):
        pid = self.pid(port)
        if pid:
            os.kill(pid, sig)
            end = time.monotonic() + 5
            while sig == signal.SIGKILL and time.monotonic() < end:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.02)
        return pid

    def stop(self):
        """SIGTERM every node, then SIGKILL what is left after 5 s."""
        pids = [p for p in (self.pid(port) for port in self.ports) if p]
        for p in pids:
            try:
                os.kill(p, signal.SIGTERM)
            except OSError:
                pass
        end = time.monotonic() + 5
        for p in pids:
            while time.monotonic() < end:
                try:
                    os.kill(p, 0)
                except OSError:
                    break
                time.sleep(0.02)
            else:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
        if self.netns:
            self._remove_hosts()

    def status(self):
        out = []
        for port in self.ports:
            state = "down"
            if self.alive(port):
                role = command(port, "ROLE", host=self.host(port), access=self.access)[0]
                role = role.decode() if isinstance(role, bytes) else role
                state = f"{role} {self.cluster_info(port).get('cluster_state')}"
            out.append((port, self.pid(port), state))
        return out


def free_port_block(n, start=17000, end=30000):
    """A base port with ``n`` free ports and their cluster-bus ports (+10000) free on 127.0.0.1."""
    def free(p):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
                return True
            except OSError:
                return False
    for base in range(start + (os.getpid() % 500) * 8, end, 16):
        if all(free(p) and free(p + 10000) for p in range(base, base + n)):
            return base
    raise RuntimeError("no free block of loopback ports for a local Redis Cluster")


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="jizhi-redis-cluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("init", "start", "stop", "status"))
    ap.add_argument("dir", help="the cluster's directory (one sub-directory per node)")
    ap.add_argument("--base-port", type=int, default=7000, help="first node's port (default 7000)")
    ap.add_argument("--masters", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=1, help="replicas per master")
    ap.add_argument("--node-timeout-ms", type=int, default=2000,
                    help="cluster-node-timeout: how long a master may be silent before its replica takes over")
    ap.add_argument("--netns", action="store_true",
                    help="init: run every node as a separate host (its own network namespace, a veth link to a "
                         "bridge; needs root and iproute2)")
    a = ap.parse_args(argv)
    c = LocalCluster(a.dir, a.base_port, a.masters, a.replicas, a.node_timeout_ms, netns=a.netns)
    try:
        if a.action == "init":
            c.init()
            print(f"wrote {len(c.ports)} node configurations under {c.root} (ports {c.ports[0]}-{c.ports[-1]})")
        elif a.action == "start":
            c.start()
            print(f"cluster ok: {c.url}")
        elif a.action == "stop":
            c.stop()
            print("stopped")
        else:
            for port, pid, state in c.status():
                print(f"{port} pid={pid or '-'} {state}")
    except (RuntimeError, TimeoutError, OSError, RedisError, subprocess.TimeoutExpired) as e:
        print(f"jizhi-redis-cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
