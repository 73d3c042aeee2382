"""Other hosts on this one machine, for the multi-host tests: each "host" is a Linux network
namespace with its own hostname, /etc/hosts and private /tmp, on a bridge in a private test
range that this module makes and removes. On them run the real daemons: an sshd per host,
and Slurm (munge, slurmctld on the head, a slurmd per host). Open MPI reaches the hosts over
that ssh. Traffic goes only to loopback and to the addresses made here.

Needs root and the packages of install/cluster-tools.sh."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

# A private test range; the head (this machine's root namespace) is .1, host N is .10+N.
SUBNET = "10.200.0"
HEAD_IP = f"{SUBNET}.1"
# Each host hides the shared /tmp behind its own: nothing passes through it.
ON_HOST = (
    'hostname "$1"; mount --bind "$2" /etc/hosts; mount -t tmpfs tmpfs /tmp; '
    'shift 2; exec "$@"'
)


def run(argv, **kwargs):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


class Hosts:
    """`count` hosts, named host1.., with the daemons that `start_sshd` and `start_slurm`
    start. `down()` stops everything, also after a failure."""

    def __init__(self, count=2):
        tag = os.getpid() % 100000
        self.names = [f"host{i}" for i in range(1, count + 1)]
        self.netns = {name: f"px{tag}{name}" for name in self.names}
        self.bridge = f"pxbr{tag}"
        self.ips = {name: f"{SUBNET}.{10 + i}" for i, name in enumerate(self.names, 1)}
        # Outside /tmp, which the hosts hide; /run is a tmpfs of root's.
        self.dir = Path(f"/run/parallax-testbed-{tag}")
        self.daemons = []
        self.ssh_config = self.dir / "ssh_config"
        self.slurm_conf = self.dir / "slurm" / "slurm.conf"

    # --- hosts ---------------------------------------------------------------------------

    def up(self):
        self.down()
        self.dir.mkdir(mode=0o700, parents=True)
        # mpiexec keeps its session files under /tmp, and one that is killed leaves them: keep
        # them in the test bed's directory instead, which goes with it.
        os.environ["OMPI_MCA_orte_tmpdir_base"] = str(self.dir)
        taken = run(["ip", "-br", "addr"]).stdout
        assert f"{SUBNET}." not in taken, f"{SUBNET}.0/24 is in use here: {taken}"
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "add", f"{HEAD_IP}/24", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        hosts = [f"127.0.0.1 localhost", f"{HEAD_IP} head"]
        hosts += [f"{ip} {name}" for name, ip in self.ips.items()]
        (self.dir / "hosts").write_text("\n".join(hosts) + "\n")
        for i, name in enumerate(self.names, 1):
            ns = self.netns[name]
            outside, inside = f"{self.bridge}v{i}", f"{self.bridge}h{i}"
            run(["ip", "netns", "add", ns])
            run(["ip", "link", "add", outside, "type", "veth", "peer", "name", inside])
            run(["ip", "link", "set", outside, "master", self.bridge, "up"])
            run(["ip", "link", "set", inside, "netns", ns])
            inns = ["ip", "-n", ns]
            run(inns + ["addr", "add", f"{self.ips[name]}/24", "dev", inside])
            run(inns + ["link", "set", inside, "up"])
            run(inns + ["link", "set", "lo", "up"])
        return self

    def on_host(self, name, argv):
        """The command line that runs `argv` on host `name`."""
        return [
            "nsenter", f"--net=/run/netns/{self.netns[name]}",
            "unshare", "--uts", "--mount", "--propagation", "private",
            "sh", "-c", ON_HOST, "sh", name, str(self.dir / "hosts"), *argv,
        ]

    def run_on(self, name, argv, **kwargs):
        return subprocess.run(self.on_host(name, argv), capture_output=True, text=True, **kwargs)

    def link(self, name, up: bool):
        """Cuts (or mends) host `name`'s link to the bridge."""
        i = self.names.index(name) + 1
        run(["ip", "link", "set", f"{self.bridge}v{i}", "up" if up else "down"])

    def pids_on(self, name):
        """Every process still in host `name`'s network namespace."""
        ns = self.netns[name]
        if not Path(f"/run/netns/{ns}").exists():
            return []
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def parallax_pids_on(self, name):
        """The Parallax processes (engines, their evaluation processes) on host `name`."""
        found = []
        for pid in self.pids_on(name):
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
            if os.path.basename(exe).startswith("parallax"):
                found.append(pid)
        return found

    def _daemon(self, argv, log_name, on=None):
        log = open(self.dir / f"{log_name}.log", "w")
        line = self.on_host(on, argv) if on else argv
        process = subprocess.Popen(
            line, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.daemons.append((process, log))
        return process

    # --- ssh -------------------------------------------------------------------------------

    def start_sshd(self):
        """An sshd on each host (port 22 of its address), and an ssh configuration that
        reaches them as host1.. with a key of the test bed's own."""
        ssh = self.dir / "ssh"
        ssh.mkdir(mode=0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "host_key")])
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "id")])
        shutil.copy(ssh / "id.pub", ssh / "authorized_keys")
        Path("/run/sshd").mkdir(exist_ok=True)
        # Each host's sessions find the toolchain and the shared home as a cluster's would.
        path = os.environ.get("PATH", "/usr/bin:/bin")
        for name in self.names:
            config = ssh / f"sshd_{name}"
            config.write_text(
                f"ListenAddress {self.ips[name]}:22\n"
                f"HostKey {ssh / 'host_key'}\n"
                f"AuthorizedKeysFile {ssh / 'authorized_keys'}\n"
                f"PidFile {ssh / f'sshd_{name}.pid'}\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                f"SetEnv PATH={path}\n"
            )
            self._daemon(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], f"sshd_{name}", name)
        entries = [f"Host {name}\n  HostName {ip}\n" for name, ip in self.ips.items()]
        entries.append(
            "Host *\n"
            f"  IdentityFile {ssh / 'id'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {ssh / 'known_hosts'}\n"
            "  StrictHostKeyChecking accept-new\n  BatchMode yes\n  ConnectTimeout 5\n"
        )
        self.ssh_config.write_text("".join(entries))
        for name in self.names:
            self._wait_for(lambda: self.ssh(name, "hostname").stdout.strip() == name,
                           f"sshd on {name}")

    def ssh(self, name, command):
        return subprocess.run(
            ["ssh", "-F", str(self.ssh_config), name, command],
            capture_output=True, text=True, timeout=20,
        )

    # --- Slurm -----------------------------------------------------------------------------

    def start_slurm(self):
        """munge, slurmctld on the head (as host `head`), a slurmd on each host; waits until
        every node is idle. Sets SLURM_CONF for this process and its children."""
        slurm = self.dir / "slurm"
        for sub in ["state", "spool", "munge", "log"]:
            (slurm / sub).mkdir(parents=True, mode=0o755)
        for name in self.names:
            (slurm / "spool" / name).mkdir()
        munge = slurm / "munge"
        run(["mungekey", "-c", "-k", str(munge / "munge.key")])
        socket = munge / "munge.socket"
        self._daemon(
            ["munged", "-F", "--force", f"--key-file={munge / 'munge.key'}",
             f"--socket={socket}", f"--pid-file={munge / 'munged.pid'}",
             f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"],
            "munged",
        )
        self._wait_for(lambda: socket.exists(), "munged")
        nodes = "".join(
            f"NodeName={name} NodeAddr={ip} Sockets=1 CoresPerSocket=2 ThreadsPerCore=1\n"
            for name, ip in self.ips.items()
        )
        self.slurm_conf.write_text(
            f"ClusterName=parallaxtest\nSlurmctldHost=head({HEAD_IP})\n"
            "SlurmUser=root\nSlurmdUser=root\nAuthType=auth/munge\n"
            f"AuthInfo=socket={socket}\n"
            "SlurmctldPort=16817\nSlurmdPort=16818\n"
            f"StateSaveLocation={slurm / 'state'}\nSlurmdSpoolDir={slurm / 'spool'}/%n\n"
            f"SlurmctldPidFile={slurm / 'slurmctld.pid'}\n"
            f"SlurmdPidFile={slurm / 'slurmd-%n.pid'}\n"
            f"SlurmctldLogFile={slurm / 'log' / 'slurmctld.log'}\n"
            f"SlurmdLogFile={slurm / 'log' / 'slurmd-%n.log'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n"
            "AccountingStorageType=accounting_storage/none\n"
            "JobAcctGatherType=jobacct_gather/none\nJobCompType=jobcomp/none\n"
            "MpiDefault=none\nMailProg=/bin/true\nReturnToService=2\n"
            "SchedulerParameters=sched_interval=1\n"
            + nodes
            + "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP "
            "OverSubscribe=FORCE:4\n"
        )
        os.environ["SLURM_CONF"] = str(self.slurm_conf)
        head = [
            "unshare", "--uts", "sh", "-c", 'hostname head; exec "$@"', "sh",
            "slurmctld", "-D", "-i", "-f", str(self.slurm_conf),
        ]
        self._daemon(head, "slurmctld")
        for name in self.names:
            self._daemon(["slurmd", "-D", "-f", str(self.slurm_conf)], f"slurmd_{name}", name)
        self._wait_for(self._nodes_idle, "idle Slurm nodes", within=30)

    def _nodes_idle(self):
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=10
        ).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(name) == "idle" for name in self.names)

    def jobs(self):
        """The test bed's Slurm jobs still queued or running."""
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, timeout=10
        ).stdout
        return [line.split() for line in out.splitlines() if line.strip()]

    # --- teardown --------------------------------------------------------------------------

    def _wait_for(self, ready, what, within=20.0):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.2)
        logs = "".join(
            f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.dir.glob("*.log"))
        )
        raise RuntimeError(f"{what} did not come up within {within} s{logs}")

    def down(self):
        """Stops every daemon and every process left on the hosts, removes the namespaces,
        the bridge and the test bed's files."""
        for process, log in reversed(self.daemons):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process, log in self.daemons:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.close()
        self.daemons = []
        for i, name in enumerate(self.names, 1):
            deadline = time.monotonic() + 10
            while self.pids_on(name) and time.monotonic() < deadline:
                for pid in self.pids_on(name):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            if Path(f"/run/netns/{self.netns[name]}").exists():
                subprocess.run(["ip", "netns", "del", self.netns[name]], capture_output=True)
            # The pair goes with either end; this one stays while a process holds the other.
            subprocess.run(["ip", "link", "del", f"{self.bridge}v{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        netns = Path("/run/netns")
        if netns.exists() and not any(netns.iterdir()):
            subprocess.run(["umount", str(netns)], capture_output=True)
            shutil.rmtree(netns, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.environ.pop("SLURM_CONF", None)
        os.environ.pop("OMPI_MCA_orte_tmpdir_base", None)
