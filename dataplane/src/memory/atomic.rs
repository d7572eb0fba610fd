//! Copies into and out of guest memory that other threads may access at the same time.
//!
//! On a source, the guest (a vCPU thread, or the toy workload's writer) keeps writing pages
//! while codec workers copy them out. Two plain copies racing on the same bytes are a data race,
//! which Rust's memory model makes undefined behaviour whatever the hardware does with it
//! (vm-memory's `volatile_memory.rs` states the same rule for guest memory). So every access
//! that may race goes through here, as relaxed atomic loads and stores of whole, aligned
//! 8-byte words: racing atomic accesses of one size are defined, and a racing copy is then a
//! mix of old and new words, which migration tolerates (the racing write dirties the page
//! again, and it is sent again). Relaxed is enough: nothing is published through these bytes,
//! the dirty log and the pause do the ordering.
//!
//! Every access, even of a single byte, is made of whole aligned words (a partial word is
//! read, or updated by compare-and-swap), so no two racing accesses ever differ in size, which
//! Rust's model does not allow either. The words a copy touches are those that overlap its
//! bytes: the callers guarantee they lie inside one mapping, which is true of every region
//! (regions start and end on page boundaries, and pages are whole words).
//!
//! On x86-64 a relaxed load or store of a `u64` is a plain `mov`: the copy costs a word-sized
//! loop instead of `memcpy`'s wider moves, a difference that a page streamed from RAM hides
//! (the codec bench measures both).

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes per word.
const WORD: usize = size_of::<u64>();

/// The word containing `p`, and `p`'s offset in it.
fn word_of(p: *mut u8) -> (*mut u64, usize) {
    let offset = p as usize % WORD;
    (p.wrapping_sub(offset).cast(), offset)
}

/// The atomic word at `word`.
///
/// # Safety
///
/// `word` must be 8-byte aligned and point to 8 bytes inside a mapping that outlives `'a`,
/// which is only ever accessed atomically, by whole words, while `'a` lasts.
unsafe fn atomic<'a>(word: *mut u64) -> &'a AtomicU64 {
    // SAFETY: the caller guarantees alignment, validity for `'a`, and that every concurrent
    // access to these bytes is atomic and word-sized.
    unsafe { AtomicU64::from_ptr(word) }
}

/// Copies `dst.len()` bytes at `src` into `dst`, with relaxed atomic word loads.
///
/// # Safety
///
/// Every 8-byte aligned word that overlaps `src .. src + dst.len()` must lie inside one live
/// mapping for the duration of the call, and every access to those words that may happen
/// meanwhile must be atomic and word-sized (that is, made through this module) or a read.
pub(crate) unsafe fn load(src: *const u8, dst: &mut [u8]) {
    if dst.is_empty() {
        return;
    }
    let (mut word, offset) = word_of(src.cast_mut());
    let mut out = dst;
    if offset != 0 {
        // SAFETY: the word overlaps the source range (the caller's contract).
        let bytes = unsafe { atomic(word) }
            .load(Ordering::Relaxed)
            .to_ne_bytes();
        let n = (WORD - offset).min(out.len());
        let (head, rest) = out.split_at_mut(n);
        head.copy_from_slice(&bytes[offset..offset + n]);
        out = rest;
        word = word.wrapping_add(1);
    }
    let (words, tail) = out.as_chunks_mut::<WORD>();
    for chunk in words {
        // SAFETY: each whole word of the range overlaps it (the caller's contract).
        *chunk = unsafe { atomic(word) }
            .load(Ordering::Relaxed)
            .to_ne_bytes();
        word = word.wrapping_add(1);
    }
    if !tail.is_empty() {
        // SAFETY: the last word overlaps the source range.
        let bytes = unsafe { atomic(word) }
            .load(Ordering::Relaxed)
            .to_ne_bytes();
        tail.copy_from_slice(&bytes[..tail.len()]);
    }
}

/// Replaces the bytes `mask` selects in the word at `word` with those of `value`, atomically
/// (a compare-and-swap loop, so a racing write to the word's other bytes is never lost).
///
/// # Safety
///
/// As for [`store`], for the one word.
unsafe fn merge(word: *mut u64, value: u64, mask: u64) {
    // SAFETY: the word overlaps the caller's destination range.
    let word = unsafe { atomic(word) };
    let mut old = word.load(Ordering::Relaxed);
    loop {
        let new = (old & !mask) | (value & mask);
        match word.compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(now) => old = now,
        }
    }
}

/// The bytes `bytes` placed at `offset` of a word, and the mask of those bytes.
fn partial(offset: usize, bytes: &[u8]) -> (u64, u64) {
    let mut value = [0u8; WORD];
    let mut mask = [0u8; WORD];
    value[offset..offset + bytes.len()].copy_from_slice(bytes);
    mask[offset..offset + bytes.len()].fill(0xFF);
    (u64::from_ne_bytes(value), u64::from_ne_bytes(mask))
}

/// Copies `src` to `dst .. dst + src.len()`, with relaxed atomic word stores (and a
/// compare-and-swap for a partial word at either end).
///
/// # Safety
///
/// Every 8-byte aligned word that overlaps `dst .. dst + src.len()` must lie inside one live,
/// writable mapping for the duration of the call, `src` must not lie in it, and every access
/// to those words that may happen meanwhile must be atomic and word-sized (made through this
/// module).
pub(crate) unsafe fn store(dst: *mut u8, src: &[u8]) {
    if src.is_empty() {
        return;
    }
    let (mut word, offset) = word_of(dst);
    let mut rest = src;
    if offset != 0 {
        let n = (WORD - offset).min(rest.len());
        let (head, after) = rest.split_at(n);
        let (value, mask) = partial(offset, head);
        // SAFETY: the word overlaps the destination range (the caller's contract).
        unsafe { merge(word, value, mask) };
        rest = after;
        word = word.wrapping_add(1);
    }
    let (words, tail) = rest.as_chunks::<WORD>();
    for chunk in words {
        // SAFETY: each whole word of the range overlaps it.
        unsafe { atomic(word) }.store(u64::from_ne_bytes(*chunk), Ordering::Relaxed);
        word = word.wrapping_add(1);
    }
    if !tail.is_empty() {
        let (value, mask) = partial(0, tail);
        // SAFETY: the last word overlaps the destination range.
        unsafe { merge(word, value, mask) };
    }
}

/// Sets `len` bytes at `dst` to `byte`, with relaxed atomic word stores.
///
/// # Safety
///
/// As for [`store`], for `dst .. dst + len`.
pub(crate) unsafe fn fill(dst: *mut u8, byte: u8, len: usize) {
    const BLOCK: usize = 512;
    let block = [byte; BLOCK];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(BLOCK);
        // SAFETY: the piece lies inside the caller's range.
        unsafe { store(dst.wrapping_add(at), &block[..n]) };
        at += n;
    }
}

/// Touches the word at `p` for writing without changing it (an atomic add of zero), so that a
/// concurrent writer never loses a write.
///
/// # Safety
///
/// As for [`store`], for the word containing `p`.
pub(crate) unsafe fn touch(p: *mut u8) {
    let (word, _) = word_of(p);
    // SAFETY: the word lies inside the caller's mapping.
    unsafe { atomic(word) }.fetch_add(0, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// Word-aligned test memory, reached only through raw pointers like a mapping.
    struct Words(Box<[AtomicU64]>);

    impl Words {
        fn new(words: usize) -> Self {
            Words((0..words).map(|_| AtomicU64::new(0)).collect())
        }

        fn ptr(&self) -> *mut u8 {
            self.0.as_ptr().cast_mut().cast()
        }

        fn bytes(&self) -> Vec<u8> {
            let mut out = vec![0u8; self.0.len() * WORD];
            // SAFETY: the whole buffer, which `self` keeps alive; only atomic accesses.
            unsafe { load(self.ptr(), &mut out) };
            out
        }
    }

    #[test]
    fn copies_at_every_alignment_and_length_match_a_plain_copy() {
        let memory = Words::new(8);
        let mut model = vec![0u8; 64];
        let mut seed = 1u8;
        for start in 0..20 {
            for len in 0..30 {
                let src: Vec<u8> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(31).wrapping_add(7);
                        seed
                    })
                    .collect();
                // SAFETY: start + len <= 49 bytes of a 64-byte buffer.
                unsafe { store(memory.ptr().wrapping_add(start), &src) };
                model[start..start + len].copy_from_slice(&src);
                assert_eq!(memory.bytes(), model, "store at {start}, {len} bytes");
                let mut back = vec![0u8; len];
                // SAFETY: as above.
                unsafe { load(memory.ptr().wrapping_add(start), &mut back) };
                assert_eq!(back, src, "load at {start}, {len} bytes");
                // SAFETY: as above.
                unsafe { fill(memory.ptr().wrapping_add(start), 0xA5, len) };
                model[start..start + len].fill(0xA5);
                assert_eq!(memory.bytes(), model, "fill at {start}, {len} bytes");
            }
        }
        // SAFETY: inside the buffer; an add of zero changes nothing.
        unsafe { touch(memory.ptr().wrapping_add(13)) };
        assert_eq!(memory.bytes(), model);
    }

    /// A reader copying while a writer writes the same bytes: defined behaviour (Miri's race
    /// detector checks this; a plain `copy_nonoverlapping` on both sides is reported as a data
    /// race), and the reader sees whole words of one write or the other.
    #[test]
    fn racing_copies_are_atomic_per_word() {
        let memory = Arc::new(Words::new(16));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (memory, stop) = (Arc::clone(&memory), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut byte = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    byte = byte.wrapping_add(1);
                    // SAFETY: the whole buffer, alive for the thread; only atomic accesses.
                    unsafe { fill(memory.ptr(), byte, 128) };
                    // A partial, unaligned write too.
                    // SAFETY: bytes 3..20 of the buffer.
                    unsafe { store(memory.ptr().wrapping_add(3), &[byte; 17]) };
                }
            })
        };
        let mut page = [0u8; 128];
        for _ in 0..if cfg!(miri) { 20 } else { 2000 } {
            // SAFETY: the whole buffer; only atomic accesses.
            unsafe { load(memory.ptr(), &mut page) };
            for word in page[24..].chunks_exact(WORD) {
                assert!(word.iter().all(|&b| b == word[0]), "a word was torn");
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
    }
}
