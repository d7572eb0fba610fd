//! A real link between two hosts on one machine: two network namespaces joined by a veth pair,
//! optionally shaped with `tbf` (this kernel has no `netem`), so that a migration crosses a
//! kernel-limited link and not only ramjet's own `max_bandwidth`. The namespaces and the veth
//! pair are made with iproute2's `ip` and `tc` (as root) and removed when the [`Link`] drops.
//!
//! A thread enters a side with [`Link::spawn`]: sockets it makes from then on belong to that
//! side's namespace (threads it spawns inherit it), so a receiver bound there on
//! [`Link::RECEIVER_IP`] is reached from the sender's side over the veth pair.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};

/// Which end of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The receiver's namespace, with [`Link::RECEIVER_IP`].
    Receiver,
    /// The sender's namespace, with [`Link::SENDER_IP`].
    Sender,
}

/// Two network namespaces joined by a veth pair; removed when dropped.
#[derive(Debug)]
pub struct Link {
    /// Namespace names, receiver's then sender's.
    names: [String; 2],
    /// Interface names, receiver's then sender's.
    devices: [String; 2],
}

/// Namespaces made by this process so far, for unique names.
static MADE: AtomicU32 = AtomicU32::new(0);

impl Link {
    /// The receiver's address on the link.
    pub const RECEIVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    /// The sender's address on the link.
    pub const SENDER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

    /// Makes the two namespaces and the veth pair between them, up and addressed, unshaped.
    ///
    /// # Errors
    ///
    /// Why it cannot (not root, no iproute2, no namespaces in this sandbox): a test skips with
    /// it. Whatever was made before the failure is removed.
    pub fn new() -> Result<Link, String> {
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id());
        let link = Link {
            names: [format!("ramjet-{id}-r"), format!("ramjet-{id}-s")],
            // Interface names have at most 15 bytes.
            devices: [format!("rj{}r", id_short(n)), format!("rj{}s", id_short(n))],
        };
        link.set_up().map_err(|e| {
            format!("cannot make network namespaces joined by veth (root and iproute2 needed): {e}")
        })?;
        Ok(link)
    }

    fn set_up(&self) -> Result<(), String> {
        let [rn, sn] = &self.names;
        let [rd, sd] = &self.devices;
        ip(&["netns", "add", rn])?;
        ip(&["netns", "add", sn])?;
        ip(&[
            "link", "add", rd, "netns", rn, "type", "veth", "peer", "name", sd, "netns", sn,
        ])?;
        for (ns, dev, addr) in [(rn, rd, Self::RECEIVER_IP), (sn, sd, Self::SENDER_IP)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Shapes both directions of the link to `bytes_per_second` with `tbf` (`None`: removes
    /// the shaping). The bucket holds 2 ms of the rate (at least 64 KiB), and a packet waits at
    /// most 20 ms for it.
    ///
    /// # Errors
    ///
    /// What `tc` says.
    pub fn shape(&self, bytes_per_second: Option<u64>) -> Result<(), String> {
        for (ns, dev) in self.names.iter().zip(&self.devices) {
            match bytes_per_second {
                Some(rate) => {
                    let burst = (rate / 500).max(64 << 10);
                    let args = [
                        "-n",
                        ns,
                        "qdisc",
                        "replace",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        &format!("{}bit", rate.saturating_mul(8)),
                        "burst",
                        &burst.to_string(),
                        "latency",
                        "20ms",
                    ];
                    run("tc", &args)?;
                }
                None => {
                    // No qdisc to delete is not an error worth reporting.
                    let _ = run("tc", &["-n", ns, "qdisc", "del", "dev", dev, "root"]);
                }
            }
        }
        Ok(())
    }

    /// Bytes that `side`'s shaper (its `tbf` qdisc) has sent, as `tc -s` counts them; `None`
    /// if that side is not shaped.
    pub fn shaped_bytes(&self, side: Side) -> Option<u64> {
        let (ns, dev) = (&self.names[side as usize], &self.devices[side as usize]);
        let out = Command::new("tc")
            .args(["-s", "-n", ns, "qdisc", "show", "dev", dev])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "qdisc tbf 8001: root refcnt 2 rate 400Mbit ...\n Sent 33816770 bytes 23371 pkt ..."
        let tbf = text.split("qdisc ").find(|q| q.starts_with("tbf"))?;
        let sent = tbf.split_once("Sent ")?.1;
        sent.split_whitespace().next()?.parse().ok()
    }

    /// A listener on [`Link::RECEIVER_IP`] (any port) in the receiver's namespace, bound from
    /// a thread there; it and the connections it accepts stay in that namespace whichever
    /// thread uses them.
    ///
    /// # Errors
    ///
    /// Entering the namespace or binding failed.
    pub fn listen(&self) -> io::Result<crate::transport::Listener> {
        let endpoint = crate::transport::Endpoint::Tcp((Self::RECEIVER_IP, 0).into());
        let bound = self
            .spawn(Side::Receiver, move || {
                crate::transport::Listener::bind(&endpoint)
            })
            .join()
            .map_err(|_| io::Error::other("the binding thread panicked"))?;
        bound?
    }

    /// Runs `f` on a new thread inside `side`'s namespace.
    ///
    /// # Errors
    ///
    /// The thread's result is an error if it could not enter the namespace.
    pub fn spawn<T, F>(&self, side: Side, f: F) -> JoinHandle<io::Result<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let name = self.names[side as usize].clone();
        thread::spawn(move || {
            enter(&name)?;
            Ok(f())
        })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Removing a namespace removes its end of the veth pair, which removes the pair.
        for name in &self.names {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// A short, per-process-unique tag for interface names (pid and count, base 36).
fn id_short(n: u32) -> String {
    let mut v = u64::from(std::process::id()) << 16 | u64::from(n & 0xFFFF);
    let mut s = Vec::new();
    while v > 0 && s.len() < 10 {
        let d = (v % 36) as u8;
        s.push(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        v /= 36;
    }
    String::from_utf8(s).unwrap_or_default()
}

/// Moves the calling thread into the named network namespace.
fn enter(name: &str) -> io::Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{name}"))?;
    // SAFETY: setns on a namespace file the thread opened; it changes only this thread's
    // network namespace, which no memory safety depends on.
    let done = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// Sends `bytes` through the link from the sender's side to the receiver's; returns what
    /// arrived.
    fn through(link: &Link, bytes: usize) -> usize {
        let listener = link
            .spawn(Side::Receiver, || {
                TcpListener::bind((Link::RECEIVER_IP, 0)).expect("bind")
            })
            .join()
            .expect("thread")
            .expect("enter");
        let port = listener.local_addr().expect("address").port();
        let reader = thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0;
            loop {
                match stream.read(&mut buf).expect("read") {
                    0 => return got,
                    n => got += n,
                }
            }
        });
        link.spawn(Side::Sender, move || {
            let mut stream = TcpStream::connect((Link::RECEIVER_IP, port)).expect("connect");
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..bytes / chunk.len() {
                stream.write_all(&chunk).expect("write");
            }
        })
        .join()
        .expect("thread")
        .expect("enter");
        reader.join().expect("reader")
    }

    /// The link carries bytes between its sides (and not over loopback: the receiver's address
    /// is not this namespace's); once shaped, they pass through the sender side's `tbf`, which
    /// counts them; unshaped again, it has no shaper. Removing the link removes both
    /// namespaces.
    #[test]
    fn a_link_carries_bytes_through_its_shaper() {
        let link = match Link::new() {
            Ok(link) => link,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        assert!(
            TcpListener::bind((Link::RECEIVER_IP, 0)).is_err(),
            "the link's addresses exist only in its namespaces"
        );
        assert_eq!(link.shaped_bytes(Side::Sender), None);
        assert_eq!(through(&link, 4 << 20), 4 << 20);
        link.shape(Some(100_000_000)).expect("shape");
        assert_eq!(through(&link, 8 << 20), 8 << 20);
        let shaped = link.shaped_bytes(Side::Sender).expect("shaped");
        assert!(shaped >= 8 << 20, "{shaped} bytes through tbf");
        link.shape(None).expect("unshape");
        assert_eq!(link.shaped_bytes(Side::Sender), None);
        let names = link.names.clone();
        drop(link);
        for name in names {
            assert!(
                !std::path::Path::new(&format!("/run/netns/{name}")).exists(),
                "{name} removed"
            );
        }
    }
}
