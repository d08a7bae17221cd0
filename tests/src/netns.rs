//! Throwaway network namespaces, veth links and cgroups for kernel tests.
//!
//! Every test host lives in a namespace the test creates and removes: two
//! namespaces joined by one veth pair, addressed from the benchmarking range
//! `198.18.0.0/15` (RFC 2544) and the documentation prefix `2001:db8::/32`, so no
//! packet of a test can reach any other host. Everything is removed on drop,
//! in reverse order, even when the test panics.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Whether this process runs as root (the kernel tests need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

/// Runs a command to completion; an error names the command and its stderr.
pub fn run(program: &str, args: &[&str]) -> io::Result<Output> {
    let out = Command::new(program).args(args).output()?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Two namespaces, `tx` and `rx`, joined by a veth pair, with static
/// neighbour entries so that no packet waits for ARP or neighbour discovery.
#[derive(Debug)]
pub struct VethPair {
    /// The sending side's namespace.
    pub tx: String,
    /// The receiving side's namespace.
    pub rx: String,
}

/// IPv4 address of the sending side.
pub const TX_V4: &str = "198.18.0.1";
/// IPv4 address of the receiving side.
pub const RX_V4: &str = "198.18.0.2";
/// IPv6 address of the sending side.
pub const TX_V6: &str = "2001:db8:b1c::1";
/// IPv6 address of the receiving side.
pub const RX_V6: &str = "2001:db8:b1c::2";

impl VethPair {
    /// Creates `bh<tag>-tx` and `bh<tag>-rx` and the link between them.
    pub fn new(tag: &str) -> io::Result<Self> {
        let pair = Self {
            tx: format!("bh{tag}-tx"),
            rx: format!("bh{tag}-rx"),
        };
        // Leftovers of a killed run of the same test.
        let _ = run("ip", &["netns", "del", &pair.tx]);
        let _ = run("ip", &["netns", "del", &pair.rx]);
        run("ip", &["netns", "add", &pair.tx])?;
        run("ip", &["netns", "add", &pair.rx])?;
        let script = format!(
            "set -e
             ip link add veth-tx netns {tx} type veth peer name veth-rx netns {rx}
             ip -n {tx} addr add {TX_V4}/24 dev veth-tx
             ip -n {rx} addr add {RX_V4}/24 dev veth-rx
             ip -n {tx} -6 addr add {TX_V6}/64 dev veth-tx nodad
             ip -n {rx} -6 addr add {RX_V6}/64 dev veth-rx nodad
             ip -n {tx} link set veth-tx up
             ip -n {rx} link set veth-rx up
             ip -n {tx} link set lo up
             ip -n {rx} link set lo up
             mac_tx=$(ip -n {tx} -br link show veth-tx | awk '{{print $3}}')
             mac_rx=$(ip -n {rx} -br link show veth-rx | awk '{{print $3}}')
             ip -n {tx} neigh replace {RX_V4} lladdr $mac_rx dev veth-tx nud permanent
             ip -n {tx} neigh replace {RX_V6} lladdr $mac_rx dev veth-tx nud permanent
             ip -n {rx} neigh replace {TX_V4} lladdr $mac_tx dev veth-rx nud permanent
             ip -n {rx} neigh replace {TX_V6} lladdr $mac_tx dev veth-rx nud permanent",
            tx = pair.tx,
            rx = pair.rx
        );
        run("sh", &["-c", &script])?;
        Ok(pair)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and so the pair.
        let _ = run("ip", &["netns", "del", &self.tx]);
        let _ = run("ip", &["netns", "del", &self.rx]);
    }
}

/// The mount point of the cgroup v2 hierarchy.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(path))
        })
        .ok_or_else(|| io::Error::other("no cgroup2 hierarchy is mounted"))
}

/// A cgroup created for one test and removed (after its processes exit) on drop.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 root>/<name>`.
    pub fn new(name: &str) -> io::Result<Self> {
        let path = cgroup2_root()?.join(name);
        if path.exists() {
            let _ = std::fs::remove_dir(&path);
        }
        std::fs::create_dir(&path)?;
        Ok(Self { path })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Spawns `program args` inside this cgroup and network namespace `netns`:
    /// the shell joins the cgroup first, then execs into the namespace, so
    /// every socket the program creates belongs to the cgroup.
    pub fn spawn_in(&self, netns: &str, program: &str, args: &[&str]) -> io::Result<Child> {
        let procs = self.path.join("cgroup.procs");
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > '{}' && exec ip netns exec '{netns}' \"$@\"",
                procs.display()
            ))
            .arg("sh")
            .arg(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Spawns `program args` in network namespace `netns`, pinned to `cpu` if given.
pub fn spawn_in_netns(
    netns: &str,
    cpu: Option<u32>,
    program: &str,
    args: &[&str],
) -> io::Result<Child> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]);
    if let Some(cpu) = cpu {
        cmd.args(["taskset", "-c", &cpu.to_string()]);
    }
    cmd.arg(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// A BPF filesystem mounted for one test at a directory of its own, so the
/// test neither needs nor touches the host's `/sys/fs/bpf`; unmounted on drop.
#[derive(Debug)]
pub struct PrivateBpffs {
    path: PathBuf,
}

impl PrivateBpffs {
    /// Mounts a fresh bpffs at `path` (unmounting a leftover of a killed run first).
    pub fn new(path: PathBuf) -> io::Result<Self> {
        let arg = path
            .to_str()
            .ok_or_else(|| io::Error::other(format!("{} is not UTF-8", path.display())))?
            .to_owned();
        let _ = run("umount", &[&arg]);
        std::fs::create_dir_all(&path)?;
        run("mount", &["-t", "bpf", "bpf", &arg])?;
        Ok(Self { path })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if let Some(path) = self.path.to_str() {
            let _ = run("umount", &[path]);
        }
    }
}

/// A directory removed, with everything in it, on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `<temp dir>/<name>` afresh.
    pub fn new(name: &str) -> io::Result<Self> {
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// `<dir>/<name>`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
