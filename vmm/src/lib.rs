//! The smallest real VMM that embeds ramjet, the way Cloud Hypervisor or Firecracker would: a
//! KVM virtual machine (rust-vmm's `kvm-ioctls`), guest RAM as vm-memory's `GuestMemoryMmap`
//! (handed to ramjet through its vm-memory adapter), KVM's own dirty log (with
//! `KVM_CLEAR_DIRTY_LOG` where the kernel offers it) OR-ed with the VMM's bitmap as the dirty
//! source, and the vCPU's state as the device-state blob.
//!
//! The guest is a program the VMM assembles itself ([`guest`]): 32-bit protected mode with
//! flat segments, writing pseudo-random pages across its memory at a rate the VMM sets, keeping
//! a counter and a running checksum in guest memory and reporting progress through port I/O.
//!
//! A migration of it, source side: [`Vm::new`], [`Machine::boot`], [`Vm::dirty_log`], then
//! ramjet's `migrate_live` with the machine as its [`Guest`].
//! Destination: [`Vm::new`] with the same size, ramjet's `receive` into [`Vm::ram`], then, only
//! if the handover says the guest may run here, [`Machine::restore`] and [`Machine::resume`].

mod error;
pub mod guest;
mod state;
mod vcpu;
mod vm;

pub use error::VmmError;
pub use vcpu::{Machine, Progress, guest_state};
pub use vm::{DirtyLog, LogMode, Memory, SyncStats, Vm, kvm_available};

use ramjet_dataplane::{BoxError, Guest};

/// The hooks of a live migration: pause kicks the vCPU out and waits, the device state is the
/// vCPU's and the VM's state taken at the pause, resume lets it run again. Handed over and
/// acknowledged, the vCPU stops for good (its memory stays, for a test to read); handed over in
/// doubt, it stays paused and does not resume until an operator calls
/// [`Machine::take_back`].
impl Guest for Machine {
    fn pause(&mut self) -> Result<(), BoxError> {
        Machine::pause(self).map_err(Into::into)
    }

    fn device_state(&mut self) -> Result<Vec<u8>, BoxError> {
        Machine::device_state(self).map_err(Into::into)
    }

    fn resume(&mut self) {
        Machine::resume(self);
    }

    fn handed_over(&mut self, acknowledged: bool) {
        if acknowledged {
            self.stop();
        } else {
            self.hold_in_doubt();
        }
    }
}
