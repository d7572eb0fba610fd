//! A KVM virtual machine and its memory: guest RAM is vm-memory's `GuestMemoryMmap` with an
//! `AtomicBitmap` (which marks the VMM's own writes), registered with KVM one slot per region,
//! and handed to ramjet through its vm-memory adapter. [`DirtyLog`] is the dirty source a
//! migration of it uses: KVM's dirty log OR-ed with the VMM's bitmap, as Cloud Hypervisor does.

use std::os::raw::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
    KVMIO, kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use ramjet_dataplane::{
    BoxError, CallerFed, DirtyError, DirtySet, DirtySource, GuestMemory as RamjetMemory,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes as _, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion as _,
};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

use crate::error::VmmError;
use crate::guest;

ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: `KVM_GET_DIRTY_LOG` leaves pages writable and
/// `KVM_CLEAR_DIRTY_LOG` re-protects the ones it is given (Linux 5.3).
const CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;

/// Guest RAM as the VMM holds it.
pub type Memory = GuestMemoryMmap<AtomicBitmap>;

/// How a VM tracks dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    /// `KVM_GET_DIRTY_LOG` returns the log and write-protects the pages again in one call (what
    /// Cloud Hypervisor and Firecracker do).
    GetOnly,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `KVM_DIRTY_LOG_INITIALLY_SET`: the log starts
    /// all set (nothing is write-protected up front), `KVM_GET_DIRTY_LOG` only reads it, and
    /// `KVM_CLEAR_DIRTY_LOG` re-protects exactly the pages just read (what QEMU does).
    ManualClear,
}

/// One KVM virtual machine with its guest RAM (one vCPU is made by [`Machine`](crate::Machine)).
pub struct Vm {
    // Dropped first: KVM refers to the memory until its VM is gone.
    pub(crate) fd: VmFd,
    pub(crate) kvm: Kvm,
    memory: Arc<Memory>,
    ram: Arc<RamjetMemory>,
    mode: LogMode,
    logging: AtomicBool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("bytes", &self.ram.total_bytes())
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// The KVM device: `/dev/kvm`, or the path in `RAMJET_KVM_DEVICE` (where a host keeps it
/// elsewhere, or to see how the VMM fails without it).
fn kvm_device() -> String {
    std::env::var("RAMJET_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into())
}

/// Opens the KVM device, saying in words why it cannot be used.
pub(crate) fn open_kvm() -> Result<Kvm, VmmError> {
    let path = kvm_device();
    let unavailable = |why: String| VmmError::Unavailable(why);
    let c_path = std::ffi::CString::new(path.clone())
        .map_err(|_| unavailable(format!("{path:?} is not a path")))?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|e| {
        unavailable(match e.errno() {
            libc::ENOENT => format!("{path} does not exist (no KVM in this kernel or machine)"),
            libc::EACCES | libc::EPERM => {
                format!("no permission to open {path} (run as root or join the kvm group)")
            }
            _ => format!("cannot open {path}: {e}"),
        })
    })?;
    if kvm.get_api_version() != 12 {
        return Err(unavailable(format!(
            "{path} speaks KVM API version {} (12 expected)",
            kvm.get_api_version()
        )));
    }
    Ok(kvm)
}

/// Whether this machine can run the VMM's guests; if not, why (for a skip or a message).
pub fn kvm_available() -> Result<(), String> {
    open_kvm().map(drop).map_err(|e| match e {
        VmmError::Unavailable(why) => why,
        other => other.to_string(),
    })
}

impl Vm {
    /// A VM with `bytes` of guest RAM at guest address 0, in one slot; with `mode`, where the
    /// kernel offers it ([`LogMode::ManualClear`] falls back to [`LogMode::GetOnly`] where not:
    /// see [`Vm::log_mode`]).
    pub fn new(bytes: u64, mode: LogMode) -> Result<Vm, VmmError> {
        if bytes > guest::MAX_BYTES || bytes == 0 || !bytes.is_multiple_of(4096) {
            return Err(VmmError::Config(format!(
                "guest RAM must be whole pages, at most {} GiB: not {bytes} bytes",
                guest::MAX_BYTES >> 30
            )));
        }
        let kvm = open_kvm()?;
        let fd = kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?;
        let len = usize::try_from(bytes).map_err(|_| VmmError::Config("too large".into()))?;
        let memory = Arc::new(
            Memory::from_ranges(&[(GuestAddress(0), len)])
                .map_err(|e| VmmError::Memory(e.to_string()))?,
        );
        let ram = Arc::new(
            RamjetMemory::from_vm_memory(&memory).map_err(|e| VmmError::Memory(e.to_string()))?,
        );
        fd.set_tss_address(usize::try_from(guest::TSS).unwrap_or(usize::MAX))
            .map_err(VmmError::kvm("KVM_SET_TSS_ADDR"))?;
        let mode = match mode {
            LogMode::ManualClear
                if fd.check_extension_raw(libc::c_ulong::from(CAP_MANUAL_DIRTY_LOG_PROTECT2))
                    & 3
                    == 3 =>
            {
                let cap = kvm_enable_cap {
                    cap: CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [
                        u64::from(
                            KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET,
                        ),
                        0,
                        0,
                        0,
                    ],
                    ..Default::default()
                };
                fd.enable_cap(&cap)
                    .map_err(VmmError::kvm("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))?;
                LogMode::ManualClear
            }
            _ => LogMode::GetOnly,
        };
        let vm = Vm {
            fd,
            kvm,
            memory,
            ram,
            mode,
            logging: AtomicBool::new(false),
        };
        vm.register(false)?;
        Ok(vm)
    }

    /// Guest RAM as ramjet moves it (the same mappings).
    pub fn ram(&self) -> &Arc<RamjetMemory> {
        &self.ram
    }

    /// Guest RAM as the VMM reads and writes it (writes through it are tracked).
    pub fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }

    /// The guest's sum over its data pages (see [`guest`]), computed by the host from its
    /// memory: what the guest reports on [`guest::PORT_SUM`] for `workload`.
    pub fn host_sum(&self, workload: &guest::Workload) -> Result<u32, VmmError> {
        let mut dwords = vec![0u8; workload.words as usize * 4];
        let mut sum = 0;
        for page in 0..u64::from(workload.pages) {
            let address = GuestAddress(guest::DATA + page * 4096);
            self.memory
                .read_slice(&mut dwords, address)
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            sum = guest::sum(sum, &dwords);
        }
        Ok(sum)
    }

    /// How this VM tracks dirty pages.
    pub fn log_mode(&self) -> LogMode {
        self.mode
    }

    /// Registers every region with KVM (slot = region index), logging dirty pages or not.
    fn register(&self, log: bool) -> Result<(), VmmError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a mapping of `memory_size` bytes at `userspace_addr` that
            // `self.memory` keeps for as long as this VM exists (`fd` is dropped first, and
            // ramjet's memory holds its own reference to the mappings as well).
            unsafe { self.fd.set_user_memory_region(region_desc) }
                .map_err(VmmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        self.logging.store(log, Ordering::SeqCst);
        Ok(())
    }

    /// Reads slot `slot`'s dirty log into `words` (a bit per page, KVM's format) and, with
    /// [`LogMode::ManualClear`], clears (write-protects again) exactly the pages read.
    fn read_log(&self, slot: u32, words: &mut [u64]) -> Result<(), VmmError> {
        let region_pages = self
            .memory
            .iter()
            .nth(slot as usize)
            .map(|r| r.len() / 4096)
            .ok_or_else(|| VmmError::Memory(format!("no slot {slot}")))?;
        if (words.len() as u64) < region_pages.div_ceil(64) {
            return Err(VmmError::Memory(format!(
                "a dirty log of {} words for slot {slot}'s {region_pages} pages",
                words.len()
            )));
        }
        let log = kvm_dirty_log {
            slot,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: words.as_mut_ptr().cast::<c_void>(),
            },
        };
        // SAFETY: `log` points at `words`, which has a bit for every page of the slot (checked
        // above), and the kernel writes no more than that.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_GET_DIRTY_LOG(), &log) };
        if ret != 0 {
            return Err(VmmError::Kvm {
                what: "KVM_GET_DIRTY_LOG",
                source: kvm_ioctls::Error::last(),
            });
        }
        if self.mode == LogMode::ManualClear && words.iter().any(|&w| w != 0) {
            let clear = kvm_clear_dirty_log {
                slot,
                num_pages: u32::try_from(region_pages).unwrap_or(u32::MAX),
                first_page: 0,
                __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: words.as_mut_ptr().cast::<c_void>(),
                },
            };
            // SAFETY: `clear` points at `words`, a bit for each of the slot's `num_pages`
            // pages (checked above); the kernel only reads it.
            let ret = unsafe { ioctl_with_ref(&self.fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
            if ret != 0 {
                return Err(VmmError::Kvm {
                    what: "KVM_CLEAR_DIRTY_LOG",
                    source: kvm_ioctls::Error::last(),
                });
            }
        }
        Ok(())
    }

    /// Starts logging dirty pages (KVM's log, and the VMM's bitmap from now) for a migration.
    /// Logging stops when the returned source is dropped.
    pub fn dirty_log(self: &Arc<Self>) -> Result<DirtyLog, VmmError> {
        if self.logging.load(Ordering::SeqCst) {
            return Err(VmmError::Config(
                "a migration of this VM is already logging dirty pages".into(),
            ));
        }
        for region in self.memory.iter() {
            region.get_mmap().bitmap().reset();
        }
        self.register(true)?;
        let vm = Arc::clone(self);
        let scratch = Mutex::new(Vec::new());
        let fed = CallerFed::new(move |region, words: &mut [u64]| -> Result<(), BoxError> {
            let slot = u32::try_from(region)?;
            let mut kvm = scratch.lock().unwrap_or_else(PoisonError::into_inner);
            kvm.clear();
            kvm.resize(words.len(), 0);
            vm.read_log(slot, &mut kvm)?;
            let vmm = vm
                .memory
                .iter()
                .nth(region)
                .map(|r| r.get_mmap().bitmap().get_and_reset())
                .ok_or_else(|| format!("no region {region}"))?;
            for (i, word) in words.iter_mut().enumerate() {
                *word |= kvm[i] | vmm.get(i).copied().unwrap_or(0);
            }
            Ok(())
        });
        Ok(DirtyLog {
            fed,
            vm: Arc::clone(self),
            syncs: SyncStats::default(),
        })
    }
}

/// The cost of the dirty syncs of one migration.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncStats {
    /// Dirty syncs (harvests; the first read at start not counted).
    pub syncs: u32,
    /// Their total time.
    pub total: Duration,
    /// The longest one.
    pub max: Duration,
    /// Dirty pages they found.
    pub pages: u64,
}

impl SyncStats {
    /// The mean cost of one sync per GiB of guest RAM, in microseconds.
    pub fn micros_per_gib(&self, guest_bytes: u64) -> f64 {
        if self.syncs == 0 || guest_bytes == 0 {
            return 0.0;
        }
        let mean = self.total.as_secs_f64() / f64::from(self.syncs);
        mean * 1e6 / (guest_bytes as f64 / f64::from(1u32 << 30))
    }
}

/// The dirty source of a KVM guest's migration: at each sync, `KVM_GET_DIRTY_LOG` (and
/// `KVM_CLEAR_DIRTY_LOG`) per slot, OR-ed with the VMM's own bitmap, handed to ramjet's
/// [`CallerFed`]. Dropping it stops dirty logging.
#[derive(Debug)]
pub struct DirtyLog {
    fed: CallerFed,
    vm: Arc<Vm>,
    syncs: SyncStats,
}

impl DirtyLog {
    /// What the syncs so far cost.
    pub fn stats(&self) -> SyncStats {
        self.syncs
    }
}

impl DirtySource for DirtyLog {
    fn name(&self) -> &'static str {
        match self.vm.mode {
            LogMode::GetOnly => "KVM dirty log (get)",
            LogMode::ManualClear => "KVM dirty log (get + clear)",
        }
    }

    fn start(&mut self, memory: &RamjetMemory) -> Result<(), DirtyError> {
        self.fed.start(memory)
    }

    fn harvest(&mut self, memory: &RamjetMemory) -> Result<DirtySet, DirtyError> {
        let started = Instant::now();
        let set = self.fed.harvest(memory)?;
        let took = started.elapsed();
        self.syncs.syncs += 1;
        self.syncs.total += took;
        self.syncs.max = self.syncs.max.max(took);
        self.syncs.pages += set.count();
        Ok(set)
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // Logging slows the guest's writes; a VM that cannot stop it keeps running correctly.
        let _ = self.vm.register(false);
    }
}
