//! Deterministic guest images for tests, benchmarks and the `ramjet image` tool: random,
//! all-zero, or mixed like a real guest (per page: 50% zero, 25% text-like, 25% random), the
//! same bytes for the same seed on every machine.

use std::fmt;
use std::io;
use std::str::FromStr;

use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};

/// A small, fast, seeded generator (xorshift64*): not for cryptography, only for reproducible
/// test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// What an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// Random bytes: nothing compresses, nothing is zero.
    Random,
    /// All zero bytes.
    Zero,
    /// Per page: 50% zero, 25% text-like (compresses 2-3x), 25% random.
    Mixed,
}

impl FromStr for ImageKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "random" => Ok(ImageKind::Random),
            "zero" => Ok(ImageKind::Zero),
            "mixed" => Ok(ImageKind::Mixed),
            _ => Err(format!(
                "unknown image kind {s:?} (expected random, zero or mixed)"
            )),
        }
    }
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageKind::Random => "random",
            ImageKind::Zero => "zero",
            ImageKind::Mixed => "mixed",
        })
    }
}

const WORDS: &[&str] = &[
    "guest",
    "page",
    "memory",
    "kernel",
    "migration",
    "the",
    "of",
    "and",
    "dirty",
    "round",
    "socket",
    "channel",
    "vcpu",
    "device",
    "state",
    "ramjet",
    "qemu",
    "libvirt",
    "{",
    "}",
    "\n",
];

/// Fills `page` with words and spaces, like text or code in a guest.
pub fn text_page(rng: &mut Rng, page: &mut [u8]) {
    let mut at = 0;
    while at < page.len() {
        let word = WORDS[usize::try_from(rng.below(WORDS.len() as u64)).unwrap_or(0)].as_bytes();
        let n = word.len().min(page.len() - at);
        page[at..at + n].copy_from_slice(&word[..n]);
        at += n;
        if at < page.len() {
            page[at] = b' ';
            at += 1;
        }
    }
}

/// Fills one page the way `kind` wants.
pub fn fill_page(kind: ImageKind, rng: &mut Rng, page: &mut [u8]) {
    match kind {
        ImageKind::Random => rng.fill(page),
        ImageKind::Zero => page.fill(0),
        ImageKind::Mixed => match rng.below(4) {
            0 | 1 => page.fill(0),
            2 => text_page(rng, page),
            _ => rng.fill(page),
        },
    }
}

/// Writes a `kind` image from `seed` over every region of `memory`.
pub fn fill(memory: &GuestMemory, kind: ImageKind, seed: u64) -> Result<(), MemoryError> {
    let mut rng = Rng::new(seed);
    let mut page = vec![0u8; PAGE_SIZE];
    for (region, r) in memory.regions().iter().enumerate() {
        for index in 0..r.layout().pages() {
            fill_page(kind, &mut rng, &mut page);
            memory.write(region, index * PAGE_SIZE as u64, &page)?;
        }
    }
    Ok(())
}

/// Writes a `bytes`-long image of `kind` into `file` (truncated first): the same bytes
/// [`fill`] puts into a one-region guest of that size with the same seed. Zero pages are left
/// as holes. `bytes` must be a whole number of pages.
pub fn write_file(file: &std::fs::File, kind: ImageKind, seed: u64, bytes: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    if !bytes.is_multiple_of(PAGE_SIZE as u64) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("an image is whole {PAGE_SIZE}-byte pages; {bytes} bytes is not"),
        ));
    }
    file.set_len(0)?;
    file.set_len(bytes)?;
    let mut rng = Rng::new(seed);
    let mut page = vec![0u8; PAGE_SIZE];
    for index in 0..bytes / PAGE_SIZE as u64 {
        fill_page(kind, &mut rng, &mut page);
        if page.iter().any(|&b| b != 0) {
            file.write_all_at(&page, index * PAGE_SIZE as u64)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{is_zero, looks_compressible};

    #[test]
    fn an_image_file_holds_what_fill_puts_in_memory() {
        let file = crate::memory::tests::scratch_file("image", 0);
        write_file(&file, ImageKind::Mixed, 9, 256 * PAGE_SIZE as u64).unwrap();
        let memory = GuestMemory::anonymous(256 * PAGE_SIZE as u64).unwrap();
        fill(&memory, ImageKind::Mixed, 9).unwrap();
        // SAFETY: the file is private to this test and not truncated while mapped.
        let region =
            unsafe { crate::memory::Region::from_file(0, crate::memory::GuestAddr(0), &file) };
        let mapped = GuestMemory::new(vec![region.unwrap()]).unwrap();
        assert!(mapped.content_eq(&memory).unwrap());
        assert!(write_file(&file, ImageKind::Zero, 1, 100).is_err());
    }

    #[test]
    fn images_are_deterministic_and_mixed_as_promised() {
        let a = GuestMemory::anonymous(1024 * PAGE_SIZE as u64).unwrap();
        let b = GuestMemory::anonymous(1024 * PAGE_SIZE as u64).unwrap();
        fill(&a, ImageKind::Mixed, 42).unwrap();
        fill(&b, ImageKind::Mixed, 42).unwrap();
        assert!(a.content_eq(&b).unwrap());
        fill(&b, ImageKind::Mixed, 43).unwrap();
        assert!(!a.content_eq(&b).unwrap());
        let mut page = vec![0u8; PAGE_SIZE];
        let (mut zero, mut text) = (0, 0);
        for p in 0..1024 {
            a.read(0, p * PAGE_SIZE as u64, &mut page).unwrap();
            if is_zero(&page) {
                zero += 1;
            } else if looks_compressible(&page) {
                text += 1;
            }
        }
        assert!((450..575).contains(&zero), "{zero} zero pages");
        assert!((200..315).contains(&text), "{text} text pages");
        assert_eq!("mixed".parse(), Ok(ImageKind::Mixed));
        assert!("sparse".parse::<ImageKind>().is_err());
    }
}
