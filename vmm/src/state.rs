//! The device state ramjet carries: every piece of vCPU and VM state the guest needs, taken
//! while the vCPU is out of `KVM_RUN` with nothing pending, and put back on the destination
//! before it runs.
//!
//! Encoding (little-endian), version 1:
//!
//! | bytes | what |
//! |---|---|
//! | 8 | magic `RJKVMST\0` |
//! | 4 | version (1) |
//! | 4 | section count |
//! | per section: 4, 4, len | tag, length, the section's bytes |
//!
//! Sections (each once, all required, in any order): 1 `kvm_regs`, 2 `kvm_sregs`, 3 the xsave
//! area (4096 bytes: x87, SSE, AVX and what else the CPU saves), 4 `kvm_xcrs`, 5 MSRs
//! (`kvm_msr_entry` × n, n ≤ 256), 6 `kvm_vcpu_events`, 7 `kvm_mp_state`, 8 `kvm_debugregs`,
//! 9 CPUID (`kvm_cpuid_entry2` × n, n ≤ 256), 10 the VM's `kvm_clock_data`, 11 the vCPU's TSC
//! frequency in kHz (u32; 0: unknown). Each struct is its kernel layout byte for byte. A blob
//! that is shorter or longer than its sections, has a section of the wrong length, a section
//! twice, one missing or one this version does not know is refused with the reason.

use kvm_bindings::{CpuId, Msrs};
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs,
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::error::VmmError;

const MAGIC: &[u8; 8] = b"RJKVMST\0";
const VERSION: u32 = 1;

const REGS: u32 = 1;
const SREGS: u32 = 2;
const XSAVE: u32 = 3;
const XCRS: u32 = 4;
const MSRS: u32 = 5;
const EVENTS: u32 = 6;
const MP_STATE: u32 = 7;
const DEBUGREGS: u32 = 8;
const CPUID: u32 = 9;
const CLOCK: u32 = 10;
const TSC_KHZ: u32 = 11;
const SECTIONS: u32 = 11;

/// The state of the VM's one vCPU, and the VM's own.
#[derive(Clone)]
pub(crate) struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: [u32; 1024],
    xcrs: kvm_xcrs,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    debugregs: kvm_debugregs,
    cpuid: Vec<kvm_cpuid_entry2>,
    clock: kvm_clock_data,
    tsc_khz: u32,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .field("cpuid", &self.cpuid.len())
            .finish_non_exhaustive()
    }
}

/// Whether the xsave area fits `kvm_xsave` (4 KiB): without AMX it does.
pub(crate) fn check_xsave_size(vm: &VmFd) -> Result<(), VmmError> {
    let size = vm.check_extension_int(Cap::Xsave2);
    if usize::try_from(size).unwrap_or(0) > size_of::<kvm_xsave>() {
        return Err(VmmError::Unavailable(format!(
            "this CPU's xsave area is {size} bytes, more than the 4096 this VMM saves"
        )));
    }
    Ok(())
}

impl VcpuState {
    /// Takes the state of `vcpu` (out of `KVM_RUN`, nothing pending) and of `vm`. `msr_list`
    /// is the MSRs to save (KVM's index list); the ones KVM cannot read are left out.
    pub(crate) fn save(vm: &VmFd, vcpu: &VcpuFd, msr_list: &[u32]) -> Result<Self, VmmError> {
        // KVM_GET_MP_STATE first (it may change the LAPIC), KVM_GET_VCPU_EVENTS last.
        let mp_state = vcpu
            .get_mp_state()
            .map_err(VmmError::kvm("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(VmmError::kvm("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(VmmError::kvm("KVM_GET_SREGS"))?;
        let xsave = vcpu
            .get_xsave()
            .map_err(VmmError::kvm("KVM_GET_XSAVE"))?
            .region;
        let xcrs = vcpu.get_xcrs().map_err(VmmError::kvm("KVM_GET_XCRS"))?;
        let debugregs = vcpu
            .get_debug_regs()
            .map_err(VmmError::kvm("KVM_GET_DEBUGREGS"))?;
        let msrs = read_msrs(vcpu, msr_list)?;
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::kvm("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
        let clock = vm.get_clock().map_err(VmmError::kvm("KVM_GET_CLOCK"))?;
        let events = vcpu
            .get_vcpu_events()
            .map_err(VmmError::kvm("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            regs,
            sregs,
            xsave,
            xcrs,
            msrs,
            events,
            mp_state,
            debugregs,
            cpuid,
            clock,
            tsc_khz,
        })
    }

    /// Puts the state into a new `vcpu` of `vm`, which has not run. Every MSR must be taken.
    pub(crate) fn restore(&self, vm: &VmFd, vcpu: &VcpuFd) -> Result<(), VmmError> {
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|e| VmmError::State(format!("CPUID: {e:?}")))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(VmmError::kvm("KVM_SET_CPUID2"))?;
        if self.tsc_khz != 0 && vcpu.get_tsc_khz().ok() != Some(self.tsc_khz) {
            vcpu.set_tsc_khz(self.tsc_khz)
                .map_err(VmmError::kvm("KVM_SET_TSC_KHZ"))?;
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(VmmError::kvm("KVM_SET_MP_STATE"))?;
        // SET_REGS before SET_VCPU_EVENTS (it clears pending exceptions); SET_SREGS before
        // SET_MSRS.
        vcpu.set_regs(&self.regs)
            .map_err(VmmError::kvm("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(VmmError::kvm("KVM_SET_SREGS"))?;
        check_xsave_size(vm)?;
        let xsave = kvm_xsave {
            region: self.xsave,
            ..Default::default()
        };
        // SAFETY: `check_xsave_size` just made sure KVM reads no more than `kvm_xsave`'s 4096
        // bytes (KVM_CAP_XSAVE2's size fits), so the kernel stays inside `xsave`.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(VmmError::kvm("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs)
            .map_err(VmmError::kvm("KVM_SET_XCRS"))?;
        write_msrs(vcpu, &self.msrs)?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(VmmError::kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(VmmError::kvm("KVM_SET_VCPU_EVENTS"))?;
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(VmmError::kvm("KVM_SET_CLOCK"))?;
        Ok(())
    }

    /// The blob, as described in the module docs.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192 + self.msrs.len() * 16 + self.cpuid.len() * 40);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&SECTIONS.to_le_bytes());
        section(&mut out, REGS, self.regs.as_bytes());
        section(&mut out, SREGS, self.sregs.as_bytes());
        section(&mut out, XSAVE, self.xsave.as_bytes());
        section(&mut out, XCRS, self.xcrs.as_bytes());
        section(&mut out, MSRS, self.msrs.as_bytes());
        section(&mut out, EVENTS, self.events.as_bytes());
        section(&mut out, MP_STATE, self.mp_state.as_bytes());
        section(&mut out, DEBUGREGS, self.debugregs.as_bytes());
        section(&mut out, CPUID, self.cpuid.as_bytes());
        section(&mut out, CLOCK, self.clock.as_bytes());
        section(&mut out, TSC_KHZ, &self.tsc_khz.to_le_bytes());
        out
    }

    /// Reads a blob made by [`encode`](Self::encode), refusing anything else with the reason.
    pub(crate) fn decode(blob: &[u8]) -> Result<Self, VmmError> {
        let bad = |why: String| VmmError::State(why);
        let header = blob
            .get(..16)
            .ok_or_else(|| bad(format!("{} bytes: shorter than its header", blob.len())))?;
        if &header[..8] != MAGIC {
            return Err(bad("not a ramjet KVM vCPU state (bad magic)".into()));
        }
        let version = u32_at(header, 8);
        if version != VERSION {
            return Err(bad(format!(
                "version {version}; this VMM reads version {VERSION}"
            )));
        }
        let count = u32_at(header, 12);
        if count != SECTIONS {
            return Err(bad(format!("{count} sections; version 1 has {SECTIONS}")));
        }
        let mut sections: [Option<&[u8]>; SECTIONS as usize] = [None; SECTIONS as usize];
        let mut rest = &blob[16..];
        for _ in 0..count {
            let (head, tail) = rest
                .split_at_checked(8)
                .ok_or_else(|| bad("truncated in a section header".into()))?;
            let (tag, len) = (u32_at(head, 0), u32_at(head, 4) as usize);
            let (body, tail) = tail
                .split_at_checked(len)
                .ok_or_else(|| bad(format!("section {tag} is truncated")))?;
            let slot = tag
                .checked_sub(1)
                .and_then(|i| sections.get_mut(i as usize))
                .ok_or_else(|| bad(format!("unknown section {tag}")))?;
            if slot.replace(body).is_some() {
                return Err(bad(format!("section {tag} appears twice")));
            }
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes after the last section", rest.len())));
        }
        let get = |tag: u32| sections[tag as usize - 1].unwrap_or_default();
        Ok(VcpuState {
            regs: one(get(REGS), "kvm_regs")?,
            sregs: one(get(SREGS), "kvm_sregs")?,
            xsave: one(get(XSAVE), "the xsave area")?,
            xcrs: one(get(XCRS), "kvm_xcrs")?,
            msrs: list(get(MSRS), "MSRs", KVM_MAX_MSR_ENTRIES)?,
            events: one(get(EVENTS), "kvm_vcpu_events")?,
            mp_state: one(get(MP_STATE), "kvm_mp_state")?,
            debugregs: one(get(DEBUGREGS), "kvm_debugregs")?,
            cpuid: list(get(CPUID), "CPUID", KVM_MAX_CPUID_ENTRIES)?,
            clock: one(get(CLOCK), "kvm_clock_data")?,
            tsc_khz: one(get(TSC_KHZ), "the TSC frequency")?,
        })
    }
}

/// Reads the MSRs of `list` that KVM can read: KVM stops at the first it cannot, which is
/// skipped.
fn read_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VmmError> {
    let mut saved = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .take(KVM_MAX_MSR_ENTRIES)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| VmmError::State(format!("MSRs: {e:?}")))?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(VmmError::kvm("KVM_GET_MSRS"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the one that failed (or go on past a full batch).
        let next = if read < entries.len() { read + 1 } else { read };
        rest = &rest[next.min(rest.len())..];
    }
    Ok(saved)
}

/// Writes `msrs`. KVM stops at the first it does not take; that one is skipped only if the
/// new vCPU already holds the saved value (nothing is lost), else the restore fails naming it.
fn write_msrs(vcpu: &VcpuFd, msrs: &[kvm_msr_entry]) -> Result<(), VmmError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let wrapped =
            Msrs::from_entries(batch).map_err(|e| VmmError::State(format!("MSRs: {e:?}")))?;
        let set = vcpu
            .set_msrs(&wrapped)
            .map_err(VmmError::kvm("KVM_SET_MSRS"))?;
        if set >= batch.len() {
            rest = &rest[batch.len()..];
            continue;
        }
        let refused = batch[set];
        let held = read_msrs(vcpu, &[refused.index])?;
        if held.first().map(|m| m.data) != Some(refused.data) {
            return Err(VmmError::State(format!(
                "KVM does not take MSR {:#x} = {:#x} here (it holds {:?})",
                refused.index,
                refused.data,
                held.first().map(|m| m.data)
            )));
        }
        rest = &rest[set + 1..];
    }
    Ok(())
}

fn section(out: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn one<T: FromBytes>(bytes: &[u8], what: &str) -> Result<T, VmmError> {
    T::read_from_bytes(bytes).map_err(|_| {
        VmmError::State(format!(
            "{what}: {} bytes, not {}",
            bytes.len(),
            size_of::<T>()
        ))
    })
}

fn list<T: FromBytes + Immutable + Clone>(
    bytes: &[u8],
    what: &str,
    max: usize,
) -> Result<Vec<T>, VmmError> {
    let size = size_of::<T>();
    if !bytes.len().is_multiple_of(size) || bytes.len() / size > max {
        return Err(VmmError::State(format!(
            "{what}: {} bytes, not a whole number of {size}-byte entries up to {max}",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(size)
        .filter_map(|chunk| T::read_from_bytes(chunk).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        VcpuState {
            regs: kvm_regs {
                rip: 0x1234,
                rax: 7,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            xsave: [3; 1024],
            xcrs: kvm_xcrs::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                reserved: 0,
                data: 99,
            }],
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state::default(),
            debugregs: kvm_debugregs::default(),
            cpuid: vec![kvm_cpuid_entry2::default(); 3],
            clock: kvm_clock_data::default(),
            tsc_khz: 2_000_000,
        }
    }

    #[test]
    fn state_round_trips() {
        let state = sample();
        let blob = state.encode();
        let back = VcpuState::decode(&blob).unwrap();
        assert_eq!(back.regs, state.regs);
        assert_eq!(back.xsave, state.xsave);
        assert_eq!(back.msrs, state.msrs);
        assert_eq!(back.cpuid.len(), 3);
        assert_eq!(back.tsc_khz, 2_000_000);
        assert_eq!(back.encode(), blob);
    }

    /// Every kind of bad blob is refused with its reason, never a panic.
    #[test]
    fn bad_blobs_are_refused_with_the_reason() {
        let blob = sample().encode();
        let refused = |blob: &[u8]| match VcpuState::decode(blob) {
            Err(VmmError::State(why)) => why,
            other => panic!("accepted: {other:?}"),
        };
        assert!(refused(&blob[..10]).contains("header"));
        let mut magic = blob.clone();
        magic[0] = b'X';
        assert!(refused(&magic).contains("magic"));
        let mut version = blob.clone();
        version[8] = 2;
        assert!(refused(&version).contains("version 2"));
        for cut in [17, 30, blob.len() - 1] {
            assert!(refused(&blob[..cut]).contains("truncated"), "{cut}");
        }
        let mut longer = blob.clone();
        longer.push(0);
        assert!(refused(&longer).contains("after the last section"));
        // The first section (regs) renamed: unknown, then a duplicate.
        let mut unknown = blob.clone();
        unknown[16] = 99;
        assert!(refused(&unknown).contains("unknown section 99"));
        let mut twice = blob.clone();
        twice[16] = 2;
        assert!(refused(&twice).contains("twice"));
        // The regs section one byte short, the bytes re-framed.
        let regs = size_of::<kvm_regs>();
        let mut short = blob[..16].to_vec();
        short.extend_from_slice(&REGS.to_le_bytes());
        short.extend_from_slice(&(u32::try_from(regs).unwrap() - 1).to_le_bytes());
        short.extend_from_slice(&blob[24..24 + regs - 1]);
        short.extend_from_slice(&blob[24 + regs..]);
        assert!(refused(&short).contains("kvm_regs"));
        // A section count that is not version 1's.
        let mut count = blob.clone();
        count[12] = 3;
        assert!(refused(&count).contains("3 sections"));
        // Random bytes after a valid header.
        let mut noise = blob[..16].to_vec();
        noise.extend((0..5000u32).map(|i| (i * 37 % 251) as u8));
        refused(&noise);
    }

    #[test]
    fn a_list_larger_than_kvm_takes_is_refused() {
        let mut state = sample();
        state.msrs = vec![kvm_msr_entry::default(); KVM_MAX_MSR_ENTRIES + 1];
        let blob = state.encode();
        assert!(matches!(
            VcpuState::decode(&blob),
            Err(VmmError::State(why)) if why.contains("MSRs")
        ));
    }
}
