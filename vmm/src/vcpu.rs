//! The guest's one vCPU on its own thread, and the hooks a migration drives it with: pause
//! (kick it out of `KVM_RUN` and wait until it is out, with nothing pending), the device state
//! (taken while paused), resume, and the handover (it never runs here again).
//!
//! The vCPU thread runs `KVM_RUN` until an exit, handles it, and looks at what it is asked to
//! do before each entry. A pause is asked with a flag and a signal (`SIGRTMIN`, whose handler
//! does nothing) sent every millisecond until the thread says it is paused: the signal makes a
//! `KVM_RUN` in progress return `EINTR`, and one that had not started yet is caught at the
//! next kick. Before saving state the thread enters `KVM_RUN` once more with `immediate_exit`
//! set, which completes a port write the guest was in the middle of without running another
//! instruction (KVM keeps no record of it in the state it returns).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, Msrs, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::error::VmmError;
use crate::guest::{self, Workload};
use crate::state::{VcpuState, check_xsave_size};
use crate::vm::Vm;

/// What the guest has reported on [`guest::PORT_TICK`] on this VMM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The first counter it reported here.
    pub first: Option<u32>,
    /// The last counter it reported here.
    pub last: Option<u32>,
    /// How many reports.
    pub reports: u64,
    /// Reports that were not the previous one plus the grant: a step back or a step lost.
    pub gaps: u64,
}

/// What the VMM wants of the vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

/// Where the vCPU thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Paused,
    Exited,
}

#[derive(Debug)]
struct Control {
    want: Want,
    phase: Phase,
    /// The state taken at the last pause.
    snapshot: Option<Vec<u8>>,
    /// Why the thread exited, if it failed.
    failure: Option<String>,
    progress: Progress,
    /// Pages per second (None: as fast as the guest goes).
    rate: Option<u64>,
    /// Ask the guest for its sum after its next batch.
    sum_wanted: bool,
    /// The sum it reported last, and whether it paused there.
    sum: Option<u32>,
    /// When the vCPU last stopped running for a pause.
    paused_at: Option<Instant>,
    /// When it last started running after a pause (or a restore).
    resumed_at: Option<Instant>,
    /// Handed over without the destination's acknowledgement: paused, and [`Machine::resume`]
    /// does nothing until [`Machine::take_back`].
    in_doubt: bool,
}

#[derive(Debug)]
struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_timeout<'a>(
        &self,
        guard: MutexGuard<'a, Control>,
        timeout: Duration,
    ) -> MutexGuard<'a, Control> {
        self.changed
            .wait_timeout(guard, timeout)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }
}

/// A booted or restored guest: its VM and its vCPU thread.
pub struct Machine {
    vm: Arc<Vm>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vm", &self.vm)
            .field("progress", &self.progress())
            .finish_non_exhaustive()
    }
}

/// The signal that kicks a vCPU out of `KVM_RUN`, its (empty) handler registered once.
fn kick_signal() -> Result<i32, VmmError> {
    extern "C" fn kicked(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    let signal = SIGRTMIN();
    REGISTERED
        .get_or_init(|| register_signal_handler(signal, kicked).map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| VmmError::Unavailable(format!("cannot install the vCPU kick signal: {e}")))?;
    Ok(signal)
}

/// `IA32_MTRR_DEF_TYPE`: the memory type of what no MTRR covers.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// Its enable bit.
const MTRR_ENABLE: u64 = 1 << 11;
/// Write-back.
const MTRR_WRITE_BACK: u64 = 6;

/// Flat 32-bit protected mode: the segments the GDT at [`guest::GDT`] describes.
fn protected_mode(sregs: &mut kvm_sregs) {
    let segment = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = segment(0x08, 0xb);
    let data = segment(0x10, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = guest::GDT;
    sregs.gdt.limit = 23;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    // Protection on, paging off; no long mode.
    sregs.cr0 = 0x11;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

impl Machine {
    /// Boots `vm` with the workload: writes the GDT, the program, the state and the mailbox
    /// into guest memory (the data pages keep what they hold), sets up the vCPU in flat
    /// protected mode and runs it, pacing it to `rate` pages a second (None: unpaced).
    pub fn boot(vm: Arc<Vm>, workload: Workload, rate: Option<u64>) -> Result<Machine, VmmError> {
        let memory = vm.memory();
        let write = |address: u64, bytes: &[u8]| {
            memory
                .write_slice(bytes, GuestAddress(address))
                .map_err(|e| VmmError::Memory(e.to_string()))
        };
        let last = guest::DATA + u64::from(workload.pages) * 4096;
        if last > vm.ram().total_bytes() {
            return Err(VmmError::Config(format!(
                "the workload's data pages end at {last:#x}, past the guest's RAM"
            )));
        }
        let mut gdt = Vec::new();
        for entry in [0, guest::GDT_CODE, guest::GDT_DATA] {
            gdt.extend_from_slice(&u64::to_le_bytes(entry));
        }
        write(guest::GDT, &gdt)?;
        write(guest::CODE, &guest::program())?;
        let mut state = Vec::new();
        for word in [
            0,
            workload.seed,
            0,
            workload.pages,
            u32::try_from(guest::DATA >> 12).unwrap_or(0),
            workload.words,
        ] {
            state.extend_from_slice(&word.to_le_bytes());
        }
        write(guest::STATE, &state)?;
        let mut mailbox = Vec::new();
        for word in [workload.grant, 0, 0] {
            mailbox.extend_from_slice(&u32::to_le_bytes(word));
        }
        write(guest::MAILBOX, &mailbox)?;

        let vcpu = vm
            .fd
            .create_vcpu(0)
            .map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
        let cpuid = vm
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(VmmError::kvm("KVM_SET_CPUID2"))?;
        let mut sregs = vcpu.get_sregs().map_err(VmmError::kvm("KVM_GET_SREGS"))?;
        protected_mode(&mut sregs);
        vcpu.set_sregs(&sregs)
            .map_err(VmmError::kvm("KVM_SET_SREGS"))?;
        // Memory is write-back, as firmware would set it: with MTRRs off, all of it is
        // uncached, and the guest writes a page in half a millisecond instead of a microsecond.
        let mtrr = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE | MTRR_WRITE_BACK,
            ..Default::default()
        }])
        .map_err(|e| VmmError::Config(format!("MSRs: {e:?}")))?;
        if vcpu
            .set_msrs(&mtrr)
            .map_err(VmmError::kvm("KVM_SET_MSRS"))?
            != 1
        {
            return Err(VmmError::Unavailable(
                "KVM refused to make guest memory write-back (IA32_MTRR_DEF_TYPE)".into(),
            ));
        }
        let regs = kvm_regs {
            rip: guest::CODE,
            rflags: 0x2,
            ..Default::default()
        };
        vcpu.set_regs(&regs)
            .map_err(VmmError::kvm("KVM_SET_REGS"))?;
        Machine::start(vm, vcpu, rate, Want::Run)
    }

    /// The destination's guest: a new vCPU of `vm` given the device state `blob` (as
    /// [`Machine::device_state`] made it on the source), paused. [`Machine::resume`] runs it
    /// (once the handover says it may).
    pub fn restore(vm: Arc<Vm>, blob: &[u8], rate: Option<u64>) -> Result<Machine, VmmError> {
        let state = VcpuState::decode(blob)?;
        let vcpu = vm
            .fd
            .create_vcpu(0)
            .map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
        state.restore(&vm.fd, &vcpu)?;
        Machine::start(vm, vcpu, rate, Want::Pause)
    }

    fn start(
        vm: Arc<Vm>,
        vcpu: VcpuFd,
        rate: Option<u64>,
        want: Want,
    ) -> Result<Machine, VmmError> {
        kick_signal()?;
        check_xsave_size(&vm.fd)?;
        let msrs = vm
            .kvm
            .get_msr_index_list()
            .map_err(VmmError::kvm("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                want,
                phase: if want == Want::Run {
                    Phase::Running
                } else {
                    Phase::Paused
                },
                snapshot: None,
                failure: None,
                progress: Progress::default(),
                rate,
                sum_wanted: false,
                sum: None,
                paused_at: None,
                resumed_at: None,
                in_doubt: false,
            }),
            changed: Condvar::new(),
        });
        let mut thread = VcpuThread {
            vcpu,
            vm: Arc::clone(&vm),
            shared: Arc::clone(&shared),
            msrs,
            next: Instant::now(),
        };
        let handle = thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                let result = thread.run();
                let mut control = thread.shared.lock();
                if let Err(e) = result {
                    control.failure = Some(e.to_string());
                }
                control.phase = Phase::Exited;
                thread.shared.changed.notify_all();
            })
            .map_err(|e| VmmError::Config(format!("cannot start the vCPU thread: {e}")))?;
        Ok(Machine {
            vm,
            shared,
            thread: Some(handle),
        })
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// What the guest has reported here.
    pub fn progress(&self) -> Progress {
        self.shared.lock().progress
    }

    /// When the vCPU last stopped for a pause: the guest ran no instruction after it.
    pub fn paused_at(&self) -> Option<Instant> {
        self.shared.lock().paused_at
    }

    /// When the vCPU last started running after a pause or a restore.
    pub fn resumed_at(&self) -> Option<Instant> {
        self.shared.lock().resumed_at
    }

    /// Whether the vCPU runs (not paused, not exited).
    pub fn is_running(&self) -> bool {
        let control = self.shared.lock();
        control.phase == Phase::Running && control.want == Want::Run
    }

    /// Paces the guest to `rate` pages a second from now (None: unpaced).
    pub fn set_rate(&self, rate: Option<u64>) {
        self.shared.lock().rate = rate;
        self.shared.changed.notify_all();
    }

    /// Stops the vCPU: kicks it out of `KVM_RUN` and returns once it is out with nothing
    /// pending and its state is taken. Nothing writes guest memory after this returns.
    pub fn pause(&self) -> Result<(), VmmError> {
        let signal = kick_signal()?;
        let mut control = self.shared.lock();
        if control.want == Want::Stop {
            return Err(VmmError::Config(
                "the guest was handed over or stopped".into(),
            ));
        }
        control.want = Want::Pause;
        self.shared.changed.notify_all();
        loop {
            match control.phase {
                Phase::Paused if control.snapshot.is_some() => return Ok(()),
                Phase::Exited => return Err(self.exited(&control)),
                _ => {}
            }
            drop(control);
            if let Some(thread) = &self.thread {
                // ESRCH (the thread just exited) shows in the phase at the next look.
                let _ = thread.kill(signal);
            }
            control = self.shared.lock();
            control = self.shared.wait_timeout(control, Duration::from_millis(1));
        }
    }

    fn exited(&self, control: &Control) -> VmmError {
        VmmError::Guest(
            control
                .failure
                .clone()
                .unwrap_or_else(|| "the vCPU thread exited".into()),
        )
    }

    /// The device state taken at the last pause (the guest must be paused).
    pub fn device_state(&self) -> Result<Vec<u8>, VmmError> {
        let control = self.shared.lock();
        match (control.phase, &control.snapshot) {
            (Phase::Paused, Some(blob)) => Ok(blob.clone()),
            (Phase::Exited, _) => Err(self.exited(&control)),
            _ => Err(VmmError::Config(
                "the device state is taken while the guest is paused".into(),
            )),
        }
    }

    /// Lets a paused guest run again (a stopped one stays stopped, and one handed over in
    /// doubt stays paused: see [`Machine::take_back`]).
    pub fn resume(&self) {
        let mut control = self.shared.lock();
        if control.want == Want::Pause && !control.in_doubt {
            control.want = Want::Run;
            control.snapshot = None;
        }
        self.shared.changed.notify_all();
    }

    /// The guest was handed over but the destination did not acknowledge the go: keeps it
    /// paused, never to run here on its own ([`Machine::resume`] does nothing), until an
    /// operator who knows the destination did not run it calls [`Machine::take_back`], or it
    /// is stopped.
    pub fn hold_in_doubt(&self) {
        self.shared.lock().in_doubt = true;
    }

    /// An operator's decision for a guest held in doubt: the destination does not run it, so
    /// it runs here again.
    pub fn take_back(&self) {
        self.shared.lock().in_doubt = false;
        self.resume();
    }

    /// Stops the vCPU for good (the guest was handed over, or is shut down): it never runs
    /// here again. Guest memory stays readable.
    pub fn stop(&self) {
        self.shared.lock().want = Want::Stop;
        self.shared.changed.notify_all();
        let signal = kick_signal();
        let mut control = self.shared.lock();
        while control.phase != Phase::Exited {
            drop(control);
            if let (Some(thread), Ok(signal)) = (&self.thread, &signal) {
                let _ = thread.kill(*signal);
            }
            control = self.shared.lock();
            control = self.shared.wait_timeout(control, Duration::from_millis(1));
        }
    }

    /// Asks the guest for the sum of its data pages after its next batch, and pauses it right
    /// there: returns the guest's sum once it is paused, so the memory is as the guest summed it.
    pub fn sum_and_pause(&self, timeout: Duration) -> Result<u32, VmmError> {
        let deadline = Instant::now() + timeout;
        let mut control = self.shared.lock();
        control.sum = None;
        control.sum_wanted = true;
        self.shared.changed.notify_all();
        loop {
            if control.phase == Phase::Exited {
                return Err(self.exited(&control));
            }
            if let Some(sum) = control.sum {
                if control.phase == Phase::Paused {
                    return Ok(sum);
                }
            } else if control.want != Want::Run {
                return Err(VmmError::Config("the guest is not running".into()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(VmmError::Guest(format!(
                    "no sum within {timeout:?} (last counter {:?})",
                    control.progress.last
                )));
            }
            control = self
                .shared
                .wait_timeout(control, left.min(Duration::from_millis(10)));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The vCPU thread's own state.
struct VcpuThread {
    vcpu: VcpuFd,
    vm: Arc<Vm>,
    shared: Arc<Shared>,
    msrs: Vec<u32>,
    /// When the guest may start its next batch.
    next: Instant,
}

impl VcpuThread {
    fn run(&mut self) -> Result<(), VmmError> {
        loop {
            if !self.obey()? {
                return Ok(());
            }
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    let mut value = [0u8; 4];
                    let n = data.len().min(4);
                    value[..n].copy_from_slice(&data[..n]);
                    self.port_write(port, u32::from_le_bytes(value))?;
                }
                Ok(VcpuExit::Hlt) => return Err(VmmError::Guest("it halted".into())),
                Ok(exit) => {
                    return Err(VmmError::Guest(format!("an unexpected exit: {exit:?}")));
                }
                // Kicked.
                Err(e) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(VmmError::kvm("KVM_RUN")(e)),
            }
        }
    }

    /// Does what the VMM wants before the next `KVM_RUN`: returns whether to run.
    fn obey(&mut self) -> Result<bool, VmmError> {
        let mut control = self.shared.lock();
        loop {
            match (control.want, control.phase) {
                (Want::Stop, _) => return Ok(false),
                (Want::Run, Phase::Paused) => {
                    control.phase = Phase::Running;
                    control.resumed_at = Some(Instant::now());
                    self.next = Instant::now();
                    self.shared.changed.notify_all();
                }
                (Want::Run, _) => return Ok(true),
                (Want::Pause, Phase::Running) => {
                    drop(control);
                    let (stopped, snapshot) = self.settle_and_save()?;
                    control = self.shared.lock();
                    control.snapshot = Some(snapshot);
                    control.phase = Phase::Paused;
                    control.paused_at = Some(stopped);
                    self.shared.changed.notify_all();
                }
                (Want::Pause, _) => {
                    if control.snapshot.is_none() {
                        // Restored and not run yet: its state is the restored one.
                        drop(control);
                        let snapshot = self.save()?;
                        control = self.shared.lock();
                        control.snapshot = Some(snapshot);
                        self.shared.changed.notify_all();
                    }
                    control = self
                        .shared
                        .wait_timeout(control, Duration::from_millis(100));
                }
            }
        }
    }

    /// Completes what the last exit left pending without running the guest, then saves.
    /// Returns when the guest stopped (out of its last `KVM_RUN`) and the state.
    fn settle_and_save(&mut self) -> Result<(Instant, Vec<u8>), VmmError> {
        let stopped = Instant::now();
        self.vcpu.set_kvm_immediate_exit(1);
        let settled = match self.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(VmmError::kvm("KVM_RUN (immediate exit)")(e)),
            Ok(exit) => Err(VmmError::Guest(format!(
                "an exit while settling for a pause: {exit:?}"
            ))),
        };
        self.vcpu.set_kvm_immediate_exit(0);
        settled?;
        Ok((stopped, self.save()?))
    }

    fn save(&self) -> Result<Vec<u8>, VmmError> {
        Ok(VcpuState::save(&self.vm.fd, &self.vcpu, &self.msrs)?.encode())
    }

    fn read(&self, address: u64) -> Result<u32, VmmError> {
        self.vm
            .memory()
            .read_obj::<u32>(GuestAddress(address))
            .map_err(|e| VmmError::Memory(e.to_string()))
    }

    fn write(&self, address: u64, value: u32) -> Result<(), VmmError> {
        self.vm
            .memory()
            .write_obj(value, GuestAddress(address))
            .map_err(|e| VmmError::Memory(e.to_string()))
    }

    fn port_write(&mut self, port: u16, value: u32) -> Result<(), VmmError> {
        match port {
            guest::PORT_TICK => {
                let grant = self.read(guest::MAILBOX_GRANT)?;
                let tick = self.read(guest::MAILBOX_TICK)?;
                // The VMM's tick lives in guest memory: a destination continues from it.
                self.write(guest::MAILBOX_TICK, tick.wrapping_add(1))?;
                let mut control = self.shared.lock();
                let progress = &mut control.progress;
                if progress
                    .last
                    .is_some_and(|last| last.wrapping_add(grant) != value)
                {
                    progress.gaps += 1;
                }
                progress.first.get_or_insert(value);
                progress.last = Some(value);
                progress.reports += 1;
                if control.sum_wanted {
                    control.sum_wanted = false;
                    drop(control);
                    self.write(guest::MAILBOX_COMMAND, u32::from(guest::COMMAND_SUM))?;
                    return Ok(());
                }
                let rate = control.rate;
                drop(control);
                self.pace(grant, rate);
                Ok(())
            }
            guest::PORT_SUM => {
                self.write(guest::MAILBOX_COMMAND, 0)?;
                let mut control = self.shared.lock();
                control.sum = Some(value);
                if control.want == Want::Run {
                    control.want = Want::Pause;
                }
                self.shared.changed.notify_all();
                Ok(())
            }
            other => Err(VmmError::Guest(format!(
                "a write of {value:#x} to port {other:#x}, which has no device"
            ))),
        }
    }

    /// Waits until the guest may start its next batch of `grant` pages at `rate` pages a
    /// second, or until the VMM wants something else.
    fn pace(&mut self, grant: u32, rate: Option<u64>) {
        let Some(rate) = rate.filter(|&r| r > 0) else {
            return;
        };
        let now = Instant::now();
        let interval = Duration::from_secs_f64(f64::from(grant) / rate as f64);
        // A guest held up (by a pause, or a slow host) does not burst to catch up.
        let earliest = now.checked_sub(interval).unwrap_or(now);
        self.next = (self.next + interval).max(earliest);
        let mut control = self.shared.lock();
        while control.want == Want::Run {
            let left = self.next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            control = self.shared.wait_timeout(control, left);
        }
    }
}

/// The guest's state as the host reads it from memory: (counter, generator, checksum).
pub fn guest_state(vm: &Vm) -> Result<(u32, u32, u32), VmmError> {
    let read = |address| {
        vm.memory()
            .read_obj::<u32>(GuestAddress(address))
            .map_err(|e| VmmError::Memory(e.to_string()))
    };
    Ok((
        read(guest::STATE_COUNTER)?,
        read(guest::STATE_X)?,
        read(guest::STATE_CHECKSUM)?,
    ))
}
