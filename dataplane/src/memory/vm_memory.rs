//! Guest memory from rust-vmm's `vm-memory` (feature `vm-memory`): how VMMs built on it (Cloud
//! Hypervisor, Firecracker and others) hand their guest RAM to ramjet.

use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion as _};

use super::error::MemoryError;
use super::guest::GuestMemory;
use super::region::{GuestAddr, Region};

impl GuestMemory {
    /// The regions of a `vm-memory` guest memory, in its order, with ids 0, 1, 2, ...; the
    /// `Arc` is kept for as long as the regions live, so the mappings stay. Dirty pages the VMM
    /// tracks in its `AtomicBitmap` reach a migration through
    /// [`CallerFed`](crate::dirty::CallerFed) (its `get_and_reset`, per region).
    pub fn from_vm_memory<B>(memory: &Arc<GuestMemoryMmap<B>>) -> Result<GuestMemory, MemoryError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let keep: Arc<dyn std::any::Any + Send + Sync> = Arc::clone(memory) as _;
        let regions = memory
            .iter()
            .enumerate()
            .map(|(index, region)| {
                let id = u32::try_from(index).unwrap_or(u32::MAX);
                let base = GuestAddr(region.start_addr().0);
                // SAFETY: vm-memory's region is one readable and writable mapping of `len`
                // bytes at `as_ptr`, which lives as long as the `GuestMemoryMmap` that `keep`
                // holds for the region's life.
                unsafe {
                    Region::from_host(
                        id,
                        base,
                        region.as_ptr(),
                        region.len(),
                        Some(Arc::clone(&keep)),
                    )
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        GuestMemory::new(regions)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn vm_memory_regions_are_shared_not_copied() {
        let vmm = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[
                (GuestAddress(0), 1 << 20),
                (GuestAddress(1 << 32), 64 << 10),
            ])
            .unwrap(),
        );
        vmm.write_slice(b"vcpu wrote this", GuestAddress((1 << 32) + 4096))
            .unwrap();
        let memory = GuestMemory::from_vm_memory(&vmm).unwrap();
        assert_eq!(memory.regions().len(), 2);
        assert_eq!(
            memory.regions()[1].layout().guest_base(),
            GuestAddr(1 << 32)
        );
        let mut buf = [0u8; 15];
        memory.read(1, 4096, &mut buf).unwrap();
        assert_eq!(&buf, b"vcpu wrote this");
        memory.write(0, 8192, b"migrated").unwrap();
        let mut back = [0u8; 8];
        vmm.read_slice(&mut back, GuestAddress(8192)).unwrap();
        assert_eq!(&back, b"migrated");
        // The mappings outlive the VMM's own handle.
        drop(vmm);
        memory.read(1, 4096, &mut buf).unwrap();
        assert_eq!(&buf, b"vcpu wrote this");
    }
}
