//! Frame buffers carved from one mapping, so that a transport can register them with the
//! kernel as a single fixed buffer (io_uring `IORING_REGISTER_BUFFERS`): the kernel then pins
//! their pages once, instead of at every zero-copy send.
//!
//! [`Arena::new`] maps the memory and mints every [`Slot`] once; a slot is the only way to
//! reach its bytes and is not `Clone`, so it owns them exclusively. The mapping lives as long
//! as the arena, which every slot (and any transport that registered it) keeps alive.

use std::io;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

/// One mapping divided into equal slots.
#[derive(Debug)]
pub struct Arena {
    map: MmapRaw,
    slot_len: usize,
}

impl Arena {
    /// Maps `slots` slots of `slot_len` bytes each (zero-filled) and returns them.
    pub(crate) fn new(slots: usize, slot_len: usize) -> io::Result<(Arc<Arena>, Vec<Slot>)> {
        let len = slots
            .checked_mul(slot_len)
            .filter(|&len| len > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty or huge arena"))?;
        let map = MmapRaw::from(MmapOptions::new().len(len).map_anon()?);
        let arena = Arc::new(Arena { map, slot_len });
        let slots = (0..slots)
            .map(|index| Slot {
                arena: Arc::clone(&arena),
                index,
            })
            .collect();
        Ok((arena, slots))
    }

    /// The first byte, for registering the whole arena with the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it has no bytes (never: an arena is made with at least one slot).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Whether `bytes` lie entirely inside the arena.
    pub fn contains(&self, bytes: &[u8]) -> bool {
        let start = self.as_ptr() as usize;
        let at = bytes.as_ptr() as usize;
        at >= start && at + bytes.len() <= start + self.len()
    }
}

/// One slot of an [`Arena`]: exclusively owned bytes, used like a `[u8]`.
#[derive(Debug)]
pub struct Slot {
    arena: Arc<Arena>,
    index: usize,
}

impl Slot {
    /// The arena it belongs to.
    #[cfg(test)]
    fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }

    fn start(&self) -> *mut u8 {
        // SAFETY: `Arena::new` minted indexes below `len / slot_len`, so the offset stays inside
        // the mapping.
        unsafe {
            self.arena
                .map
                .as_mut_ptr()
                .add(self.index * self.arena.slot_len)
        }
    }
}

impl Deref for Slot {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the slot's bytes lie inside the mapping, which the arena keeps alive while
        // `self` holds it; this slot is their only owner (each index is minted once and slots
        // are not `Clone`), so no `&mut` to them exists while `self` is borrowed.
        unsafe { std::slice::from_raw_parts(self.start(), self.arena.slot_len) }
    }
}

impl DerefMut for Slot {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only borrow of the bytes.
        unsafe { std::slice::from_raw_parts_mut(self.start(), self.arena.slot_len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_disjoint_and_inside_their_arena() {
        let (arena, mut slots) = Arena::new(3, 4096).unwrap();
        assert_eq!((arena.len(), slots.len()), (3 * 4096, 3));
        for (i, slot) in slots.iter_mut().enumerate() {
            assert_eq!(slot.len(), 4096);
            assert!(slot.iter().all(|&b| b == 0));
            slot.fill(i as u8 + 1);
            assert!(arena.contains(slot));
            assert!(Arc::ptr_eq(slot.arena(), &arena));
        }
        for (i, slot) in slots.iter().enumerate() {
            assert!(
                slot.iter().all(|&b| b == i as u8 + 1),
                "slot {i} was overwritten"
            );
        }
        assert!(!arena.contains(&[0u8; 8]));
        assert!(Arena::new(0, 4096).is_err());
        assert!(Arena::new(usize::MAX, 2).is_err());
    }
}
