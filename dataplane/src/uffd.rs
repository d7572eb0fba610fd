//! userfaultfd, as the kernel offers it (`linux/userfaultfd.h`): the descriptor, its handshake,
//! registration and the ioctls that resolve faults. Two users: write-protection dirty tracking
//! (`dirty/uffd.rs`) and the postcopy destination (`postcopy/`), which serves missing and minor
//! faults with `UFFDIO_COPY`, `UFFDIO_ZEROPAGE` and `UFFDIO_CONTINUE`.
//!
//! Every operation names host addresses of mappings this process made; the kernel checks them
//! against the registered ranges and never writes anywhere but into the page tables of the
//! registered mappings (and, for a copy, the pages it allocates for them), so none of the calls
//! can break memory safety in this process: a bad address is an `EINVAL` or `ENOENT`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

pub(crate) const UFFD_API: u64 = 0xAA;
/// Only faults from user mode are reported (enough where no kernel code touches the memory on
/// the process's behalf, and allowed without privilege on more systems).
pub(crate) const UFFD_USER_MODE_ONLY: libc::c_int = 1;

pub(crate) const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub(crate) const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub(crate) const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub(crate) const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub(crate) const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub(crate) const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

pub(crate) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub(crate) const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

/// `uffd_msg.event` of a page fault.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// `USERFAULTFD_IOC_NEW` of `/dev/userfaultfd` (`_IO(0xAA, 0x00)`).
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;

/// `_IOWR(kind, nr, size)` of asm-generic/ioctl.h.
pub(crate) const fn iowr(kind: u8, nr: u8, size: usize) -> libc::c_ulong {
    (3 << 30)
        | ((size as libc::c_ulong) << 16)
        | ((kind as libc::c_ulong) << 8)
        | nr as libc::c_ulong
}

/// `_IOR(kind, nr, size)` of asm-generic/ioctl.h.
const fn ior(kind: u8, nr: u8, size: usize) -> libc::c_ulong {
    (2 << 30)
        | ((size as libc::c_ulong) << 16)
        | ((kind as libc::c_ulong) << 8)
        | nr as libc::c_ulong
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub(crate) struct UffdioRange {
    pub(crate) start: u64,
    pub(crate) len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `uffdio_zeropage` and `uffdio_continue` have the same layout.
#[repr(C)]
#[derive(Default)]
struct UffdioPlace {
    range: UffdioRange,
    mode: u64,
    result: i64,
}

/// `struct uffd_msg`, 32 bytes: a page fault is `event`, then `flags`, `address` and the
/// faulting thread's id in the union.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    pad: u32,
}

const UFFDIO_API: libc::c_ulong = iowr(0xAA, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = iowr(0xAA, 0x00, size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: libc::c_ulong = ior(0xAA, 0x01, size_of::<UffdioRange>());
const UFFDIO_WAKE: libc::c_ulong = ior(0xAA, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: libc::c_ulong = iowr(0xAA, 0x03, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: libc::c_ulong = iowr(0xAA, 0x04, size_of::<UffdioPlace>());
const UFFDIO_WRITEPROTECT: libc::c_ulong = iowr(0xAA, 0x06, size_of::<UffdioWriteprotect>());
const UFFDIO_CONTINUE: libc::c_ulong = iowr(0xAA, 0x07, size_of::<UffdioPlace>());

/// `ioctl(fd, request, arg)`.
///
/// # Safety
///
/// `arg` must be the argument structure `request` expects, and whatever addresses it holds
/// must be valid for what the request does with them.
pub(crate) unsafe fn ioctl<T>(
    fd: &impl AsRawFd,
    request: libc::c_ulong,
    arg: &mut T,
) -> io::Result<i32> {
    // SAFETY: the caller passes the structure the request expects; it lives across the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(arg)) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// How a placement ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placed {
    /// The page was mapped by this call (and the threads waiting on it woken).
    Now,
    /// It was mapped already (`EEXIST`): by an earlier placement, never by the guest, since
    /// every access to a missing page faults to us. Nothing was written.
    Already,
}

/// A page fault read from the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fault {
    /// The faulting host address (page aligned by the kernel unless `EXACT_ADDRESS`).
    pub(crate) address: u64,
    /// `UFFD_PAGEFAULT_FLAG_*`.
    pub(crate) flags: u64,
    /// The faulting thread, with `UFFD_FEATURE_THREAD_ID`.
    pub(crate) thread: u32,
}

/// Why a userfaultfd could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// None could be created: the kernel lacks userfaultfd, or `vm.unprivileged_userfaultfd`
    /// and a missing `CAP_SYS_PTRACE` (and no access to `/dev/userfaultfd`) forbid it.
    Create(io::Error),
    /// The kernel refused the features asked for.
    Features(io::Error),
}

/// An open userfaultfd whose API handshake is done (non-blocking, close-on-exec).
#[derive(Debug)]
pub(crate) struct Userfault {
    fd: OwnedFd,
}

impl Userfault {
    /// Opens a userfaultfd and asks for `features`; `user_mode_only` reports only faults from
    /// user mode (a KVM vCPU faults from the kernel, so postcopy must not set it). Falls back
    /// to `/dev/userfaultfd` where the syscall is refused (`vm.unprivileged_userfaultfd`).
    pub(crate) fn open(features: u64, user_mode_only: bool) -> Result<Userfault, OpenError> {
        let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        if user_mode_only {
            flags |= UFFD_USER_MODE_ONLY;
        }
        // SAFETY: userfaultfd takes only flags and returns a new descriptor or -1.
        let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if ret >= 0 {
            i32::try_from(ret)
                .map_err(|_| OpenError::Create(io::Error::other("a descriptor out of range")))?
        } else {
            let refused = io::Error::last_os_error();
            Self::from_device(flags).map_err(|_| OpenError::Create(refused))?
        };
        // SAFETY: `fd` was just returned to us and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a uffdio_api.
        unsafe { ioctl(&fd, UFFDIO_API, &mut api) }.map_err(OpenError::Features)?;
        Ok(Userfault { fd })
    }

    /// A userfaultfd from `/dev/userfaultfd` (Linux 6.1), whose access is the device file's.
    fn from_device(flags: libc::c_int) -> io::Result<i32> {
        let device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument and returns a new
        // descriptor or -1.
        let ret = unsafe { libc::ioctl(device.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret)
    }

    /// Registers `len` bytes at host address `start` in `mode`; returns the ioctls the range
    /// supports (a bit per `_UFFDIO_*` number).
    ///
    /// # Safety
    ///
    /// The range must be guest memory this process mapped and reaches only through raw
    /// pointers (a [`Region`](crate::memory::Region)'s mapping): no Rust reference to its bytes
    /// may rely on them staying as they are, since a missing page placed by this descriptor
    /// appears with the placed contents.
    pub(crate) unsafe fn register(&self, start: u64, len: u64, mode: u64) -> io::Result<u64> {
        let mut register = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a uffdio_register; the kernel checks that the range is
        // mapped, and the caller that it is guest memory.
        unsafe { ioctl(&self.fd, UFFDIO_REGISTER, &mut register) }?;
        Ok(register.ioctls)
    }

    /// Unregisters a range: faults there are the kernel's again, and threads waiting on it
    /// are woken.
    pub(crate) fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER takes a uffdio_range; the kernel checks it.
        unsafe { ioctl(&self.fd, UFFDIO_UNREGISTER, &mut range) }.map(drop)
    }

    /// Write-protects (or, with `protect` false, unprotects) a range registered in WP mode.
    pub(crate) fn write_protect(&self, start: u64, len: u64, protect: bool) -> io::Result<()> {
        let mut arg = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a uffdio_writeprotect; the kernel checks the range.
        unsafe { ioctl(&self.fd, UFFDIO_WRITEPROTECT, &mut arg) }.map(drop)
    }

    /// Maps a copy of `src` at host address `dst` (missing pages of a registered range, a
    /// whole number of pages), atomically: a thread faulting there sees nothing before the
    /// whole page. Wakes the threads waiting on the range.
    pub(crate) fn copy(&self, dst: u64, src: &[u8]) -> io::Result<Placed> {
        let mut arg = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY takes a uffdio_copy; the kernel reads `len` bytes at `src`, which
        // `src` holds for the call, and writes only pages it maps into the registered range.
        retry_on_eagain(|| unsafe { ioctl(&self.fd, UFFDIO_COPY, &mut arg) }.map(drop))
    }

    /// Maps the zero page at `len` bytes of missing pages at `dst`; wakes the waiters.
    pub(crate) fn zeropage(&self, dst: u64, len: u64) -> io::Result<Placed> {
        let mut arg = UffdioPlace {
            range: UffdioRange { start: dst, len },
            ..UffdioPlace::default()
        };
        // SAFETY: UFFDIO_ZEROPAGE takes a uffdio_zeropage; the kernel checks the range.
        retry_on_eagain(|| unsafe { ioctl(&self.fd, UFFDIO_ZEROPAGE, &mut arg) }.map(drop))
    }

    /// Maps the page-cache pages already there at `len` bytes at `dst` (minor faults of a shared
    /// range); wakes the waiters.
    pub(crate) fn continue_at(&self, dst: u64, len: u64) -> io::Result<Placed> {
        let mut arg = UffdioPlace {
            range: UffdioRange { start: dst, len },
            ..UffdioPlace::default()
        };
        // SAFETY: UFFDIO_CONTINUE takes a uffdio_continue; the kernel checks the range.
        retry_on_eagain(|| unsafe { ioctl(&self.fd, UFFDIO_CONTINUE, &mut arg) }.map(drop))
    }

    /// Wakes threads waiting on a range without mapping anything (they fault again).
    pub(crate) fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE takes a uffdio_range; the kernel checks it.
        unsafe { ioctl(&self.fd, UFFDIO_WAKE, &mut range) }.map(drop)
    }

    /// Waits up to `timeout` for the descriptor to have events; true if it has.
    pub(crate) fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd, which lives across the call.
        let ret = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        match ret {
            n if n > 0 => Ok(true),
            0 => Ok(false),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(err)
                }
            }
        }
    }

    /// Reads the pending page faults into `out` (other events are skipped); returns how many.
    /// Zero when none is pending.
    pub(crate) fn read_faults(&self, out: &mut Vec<Fault>) -> io::Result<usize> {
        out.clear();
        let mut msgs = [UffdMsg::default(); 64];
        // SAFETY: reads at most the bytes of `msgs`, plain integers for which any bytes are
        // valid.
        let ret = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                size_of_val(&msgs),
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(err),
            };
        }
        let n = usize::try_from(ret).unwrap_or(0) / size_of::<UffdMsg>();
        out.extend(
            msgs[..n.min(msgs.len())]
                .iter()
                .filter(|m| m.event == UFFD_EVENT_PAGEFAULT)
                .map(|m| Fault {
                    address: m.address,
                    flags: m.flags,
                    thread: m.ptid,
                }),
        );
        Ok(out.len())
    }
}

/// Runs a placement until it is not `EAGAIN` (the range is changing under a concurrent
/// mapping change; the kernel asks to retry); `EEXIST` is [`Placed::Already`].
fn retry_on_eagain(mut place: impl FnMut() -> io::Result<()>) -> io::Result<Placed> {
    loop {
        match place() {
            Ok(()) => return Ok(Placed::Now),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(Placed::Already),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
            Err(e) => return Err(e),
        }
    }
}

const _: () = assert!(size_of::<UffdMsg>() == 32);
const _: () = assert!(size_of::<UffdioCopy>() == 40);
const _: () = assert!(size_of::<UffdioPlace>() == 32);
