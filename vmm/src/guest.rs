//! The guest program: 32-bit protected mode with flat segments, no paging, no interrupts, one
//! vCPU. The VMM assembles it at boot ([`program`]); [`Model`] is the same workload computed on
//! the host, which is how a test knows what the guest's memory and state must be.
//!
//! Guest physical memory:
//!
//! | address | what | written by |
//! |---|---|---|
//! | `0x0500` | the GDT: null, flat code (0x08), flat data (0x10) | the VMM, at boot |
//! | `0x1000` | the program | the VMM, at boot |
//! | `0x3000` | the guest's state: counter, generator, checksum, data pages | the guest |
//! | `0x4000` | the mailbox: the batch the VMM grants, a command, the VMM's tick | the VMM |
//! | 1 MiB .. end | the data pages the workload writes | the guest |
//!
//! The workload, forever: read the grant `G` from the mailbox; `G` times, step a xorshift32
//! generator `x`, pick the data page `first + (x * pages) >> 32`, fill its first `words`
//! dwords with `x` (a whole page: 1024), fold `x` and the mailbox's tick into the running checksum
//! (`checksum = rotl(checksum, 5) ^ x ^ tick`) and count one; then report the counter on port
//! [`PORT_TICK`]. The VMM paces the guest there (that is how it sets the dirty rate), increments
//! the tick and may set a command. Command [`COMMAND_SUM`] makes the guest fold the first `words`
//! dwords of every data page (`sum = rotl(sum, 1) + dword`) and report the sum on
//! [`PORT_SUM`].
//!
//! Everything the guest does follows from its state in memory and its registers: a guest that
//! continues on another host from the same memory and vCPU state writes the same pages, reports
//! the same counters and ends with the same checksum as if it had never moved.

use crate::error::VmmError;

/// Where the GDT is.
pub const GDT: u64 = 0x500;
/// Where the program starts (the first instruction).
pub const CODE: u64 = 0x1000;
/// The guest's state block.
pub const STATE: u64 = 0x3000;
/// The mailbox the VMM writes and the guest reads.
pub const MAILBOX: u64 = 0x4000;
/// The first byte of the data pages.
pub const DATA: u64 = 1 << 20;
/// The largest guest: every address must fit in 32 bits, below the 3 pages KVM keeps for the TSS
/// (set at [`TSS`]).
pub const MAX_BYTES: u64 = 3 << 30;
/// KVM's TSS pages (needed on Intel's VMX, harmless elsewhere), above any guest RAM.
pub const TSS: u64 = 0xfffb_d000;

/// State block offsets (u32 each).
pub const STATE_COUNTER: u64 = STATE;
/// The xorshift32 generator's state (never zero).
pub const STATE_X: u64 = STATE + 4;
/// The running checksum.
pub const STATE_CHECKSUM: u64 = STATE + 8;
/// How many data pages there are.
pub const STATE_PAGES: u64 = STATE + 12;
/// The first data page's number.
pub const STATE_FIRST: u64 = STATE + 16;
/// How many dwords of a page each write fills, from its start.
pub const STATE_WORDS: u64 = STATE + 20;

/// Mailbox offsets (u32 each): pages per batch.
pub const MAILBOX_GRANT: u64 = MAILBOX;
/// The command for after this batch (0: none).
pub const MAILBOX_COMMAND: u64 = MAILBOX + 4;
/// The VMM's tick: how many batches it has let pass.
pub const MAILBOX_TICK: u64 = MAILBOX + 8;

/// The guest reports its counter after every batch here (`out dx, eax`).
pub const PORT_TICK: u16 = 0x510;
/// The guest reports the sum of its data pages here.
pub const PORT_SUM: u16 = 0x511;
/// The mailbox command that asks for the sum.
pub const COMMAND_SUM: u8 = 1;

/// A flat code segment descriptor (base 0, limit 4 GiB, 32-bit, execute/read).
pub const GDT_CODE: u64 = 0x00cf_9a00_0000_ffff;
/// A flat data segment descriptor (base 0, limit 4 GiB, 32-bit, read/write).
pub const GDT_DATA: u64 = 0x00cf_9200_0000_ffff;

/// The 32-bit registers, by their encoding.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum R {
    Eax = 0,
    Ecx = 1,
    Edx = 2,
    Ebx = 3,
    Esi = 6,
    Edi = 7,
}

/// Just enough of an x86 assembler for the program: each method emits one instruction.
#[derive(Debug, Default)]
struct Asm {
    code: Vec<u8>,
}

impl Asm {
    fn here(&self) -> usize {
        self.code.len()
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }

    // Every address of the program is a constant below 1 MiB.
    #[allow(clippy::cast_possible_truncation)]
    fn disp(&mut self, address: u64) {
        self.bytes(&(address as u32).to_le_bytes());
    }

    /// `mov reg, [address]`
    fn load(&mut self, reg: R, address: u64) {
        self.bytes(&[0x8b, (reg as u8) << 3 | 5]);
        self.disp(address);
    }

    /// `mov [address], reg`
    fn store(&mut self, address: u64, reg: R) {
        self.bytes(&[0x89, (reg as u8) << 3 | 5]);
        self.disp(address);
    }

    /// `mov dst, src`
    fn mov(&mut self, dst: R, src: R) {
        self.bytes(&[0x89, 0xc0 | (src as u8) << 3 | dst as u8]);
    }

    /// `mov reg, imm32`
    fn mov_imm(&mut self, reg: R, imm: u32) {
        self.bytes(&[0xb8 + reg as u8]);
        self.bytes(&imm.to_le_bytes());
    }

    /// `shl`/`shr`/`rol reg, imm8` (`op`: 4, 5, 0)
    fn shift(&mut self, op: u8, reg: R, count: u8) {
        self.bytes(&[0xc1, 0xc0 | op << 3 | reg as u8, count]);
    }

    /// `xor dst, src`
    fn xor(&mut self, dst: R, src: R) {
        self.bytes(&[0x31, 0xc0 | (src as u8) << 3 | dst as u8]);
    }

    /// `xor reg, [address]`
    fn xor_mem(&mut self, reg: R, address: u64) {
        self.bytes(&[0x33, (reg as u8) << 3 | 5]);
        self.disp(address);
    }

    /// `add reg, [address]`
    fn add_mem(&mut self, reg: R, address: u64) {
        self.bytes(&[0x03, (reg as u8) << 3 | 5]);
        self.disp(address);
    }

    /// `mul dword [address]`: edx:eax = eax * [address]
    fn mul_mem(&mut self, address: u64) {
        self.bytes(&[0xf7, 4 << 3 | 5]);
        self.disp(address);
    }

    /// `inc dword [address]`
    fn inc_mem(&mut self, address: u64) {
        self.bytes(&[0xff, 5]);
        self.disp(address);
    }

    /// `dec reg`
    fn dec(&mut self, reg: R) {
        self.bytes(&[0xff, 0xc8 | reg as u8]);
    }

    /// `cmp dword [address], imm8`
    fn cmp_mem(&mut self, address: u64, imm: u8) {
        self.bytes(&[0x83, 7 << 3 | 5]);
        self.disp(address);
        self.bytes(&[imm]);
    }

    /// `out dx, eax` to `port`, through edx.
    fn out(&mut self, port: u16) {
        self.mov_imm(R::Edx, u32::from(port));
        self.bytes(&[0xef]);
    }

    /// `jnz target` (rel32; `target` is an offset in the program).
    fn jnz(&mut self, target: usize) {
        self.bytes(&[0x0f, 0x85]);
        self.rel32(target);
    }

    /// `jne`, as `jnz`.
    fn jne(&mut self, target: usize) {
        self.jnz(target);
    }

    /// `jmp target` (rel32).
    fn jmp(&mut self, target: usize) {
        self.bytes(&[0xe9]);
        self.rel32(target);
    }

    // The program is a few hundred bytes: every jump fits.
    #[allow(clippy::cast_possible_truncation)]
    fn rel32(&mut self, target: usize) {
        let next = self.here() + 4;
        let rel = target as i64 - next as i64;
        self.bytes(&(rel as i32).to_le_bytes());
    }
}

/// The program's machine code, to be loaded at [`CODE`].
pub fn program() -> Vec<u8> {
    let mut a = Asm::default();
    let start = a.here();
    a.load(R::Esi, MAILBOX_GRANT);
    let batch = a.here();
    // x = xorshift32(x)
    a.load(R::Eax, STATE_X);
    for (op, count) in [(4, 13), (5, 17), (4, 5)] {
        a.mov(R::Edx, R::Eax);
        a.shift(op, R::Edx, count);
        a.xor(R::Eax, R::Edx);
    }
    a.store(STATE_X, R::Eax);
    a.mov(R::Ebx, R::Eax);
    // edi = (first + (x * pages) >> 32) << 12
    a.mul_mem(STATE_PAGES);
    a.add_mem(R::Edx, STATE_FIRST);
    a.shift(4, R::Edx, 12);
    a.mov(R::Edi, R::Edx);
    // fill the page with x: cld; rep stosd
    a.mov(R::Eax, R::Ebx);
    a.load(R::Ecx, STATE_WORDS);
    a.bytes(&[0xfc, 0xf3, 0xab]);
    // checksum = rotl(checksum, 5) ^ x ^ tick
    a.load(R::Eax, STATE_CHECKSUM);
    a.shift(0, R::Eax, 5);
    a.xor(R::Eax, R::Ebx);
    a.xor_mem(R::Eax, MAILBOX_TICK);
    a.store(STATE_CHECKSUM, R::Eax);
    a.inc_mem(STATE_COUNTER);
    a.dec(R::Esi);
    a.jnz(batch);
    // report the counter; the VMM paces here
    a.load(R::Eax, STATE_COUNTER);
    a.out(PORT_TICK);
    a.cmp_mem(MAILBOX_COMMAND, COMMAND_SUM);
    a.jne(start);
    // sum = fold of the first `words` dwords of every data page
    a.load(R::Edx, STATE_PAGES);
    a.load(R::Edi, STATE_FIRST);
    a.shift(4, R::Edi, 12);
    a.xor(R::Eax, R::Eax);
    let page = a.here();
    a.mov(R::Esi, R::Edi);
    a.load(R::Ecx, STATE_WORDS);
    let word = a.here();
    a.bytes(&[0xd1, 0xc0]); // rol eax, 1
    a.bytes(&[0x03, 0x06]); // add eax, [esi]
    a.bytes(&[0x83, 0xc6, 0x04]); // add esi, 4
    a.dec(R::Ecx);
    a.jnz(word);
    a.bytes(&[0x81, 0xc7]); // add edi, 4096
    a.bytes(&4096u32.to_le_bytes());
    a.dec(R::Edx);
    a.jnz(page);
    a.out(PORT_SUM);
    a.jmp(start);
    a.code
}

/// The workload's parameters: what the VMM writes at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// The generator's first state (made odd, so never zero).
    pub seed: u32,
    /// Pages per batch: the guest reports (and the VMM paces it) after this many.
    pub grant: u32,
    /// How many data pages there are, from [`DATA`].
    pub pages: u32,
    /// How many dwords of a page each write fills from its start (1 to 1024): a whole page
    /// is the realistic write; fewer dirty as many pages at a fraction of the guest's time
    /// (which matters where KVM emulates the guest's instructions).
    pub words: u32,
}

impl Workload {
    /// Dwords a write fills unless asked otherwise: a cache line, which dirties a page as a
    /// whole page does, at a fraction of the guest's time where KVM emulates its instructions
    /// (as on a nested PVM host, where a whole-page write takes about 0.5 ms).
    pub const DEFAULT_WORDS: u32 = 16;

    /// The workload for a guest of `bytes` bytes.
    pub fn new(bytes: u64, seed: u32, grant: u32, words: u32) -> Result<Workload, VmmError> {
        if !(DATA + (64 << 10)..=MAX_BYTES).contains(&bytes) || !bytes.is_multiple_of(4096) {
            return Err(VmmError::Config(format!(
                "guest RAM must be whole pages from {} KiB to {} GiB, not {bytes} bytes",
                (DATA + (64 << 10)) >> 10,
                MAX_BYTES >> 30
            )));
        }
        if grant == 0 {
            return Err(VmmError::Config(
                "the guest must write at least one page a batch".into(),
            ));
        }
        if !(1..=1024).contains(&words) {
            return Err(VmmError::Config(format!(
                "a write fills 1 to 1024 dwords of a page, not {words}"
            )));
        }
        Ok(Workload {
            seed: seed | 1,
            grant,
            pages: u32::try_from((bytes - DATA) / 4096).unwrap_or(u32::MAX),
            words,
        })
    }
}

/// The workload's state, computed on the host: what the guest's counter, generator and checksum
/// are after each step, and which page it wrote with what.
#[derive(Debug, Clone)]
pub struct Model {
    workload: Workload,
    /// Pages written so far.
    pub counter: u32,
    /// The generator.
    pub x: u32,
    /// The running checksum.
    pub checksum: u32,
}

impl Model {
    /// The state at boot.
    pub fn new(workload: Workload) -> Model {
        Model {
            workload,
            counter: 0,
            x: workload.seed,
            checksum: 0,
        }
    }

    /// One page written: returns the page's guest address and the dword its first
    /// [`Workload::words`] dwords were filled with.
    pub fn step(&mut self) -> (u64, u32) {
        let mut x = self.x;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.x = x;
        let page = (DATA >> 12) + ((u64::from(x) * u64::from(self.workload.pages)) >> 32);
        // The VMM increments the tick once per batch, from 0 at boot.
        let tick = self.counter / self.workload.grant;
        self.checksum = self.checksum.rotate_left(5) ^ x ^ tick;
        self.counter = self.counter.wrapping_add(1);
        (page << 12, x)
    }
}

/// The guest's sum, computed on the host: continues `sum` (0 to begin with) over `data`, the
/// dwords the guest sums (the first [`Workload::words`] of each data page, in order).
pub fn sum(sum: u32, data: &[u8]) -> u32 {
    data.chunks_exact(4).fold(sum, |sum, dword| {
        let d = u32::from_le_bytes([dword[0], dword[1], dword[2], dword[3]]);
        sum.rotate_left(1).wrapping_add(d)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_encodes_what_its_comments_say() {
        let code = program();
        // mov esi, [0x4000]
        assert_eq!(&code[..6], &[0x8b, 0x35, 0x00, 0x40, 0x00, 0x00]);
        // it ends with jmp back to the start
        let end = code.len();
        assert_eq!(code[end - 5], 0xe9);
        let rel = i32::from_le_bytes(code[end - 4..].try_into().unwrap());
        assert_eq!(end as i64 + i64::from(rel), 0);
        assert!(code.len() < 4096);
    }

    #[test]
    fn the_model_picks_data_pages_only() {
        let w = Workload::new(64 << 20, 7, 10, 1024).unwrap();
        let mut model = Model::new(w);
        for _ in 0..10_000 {
            let (page, _) = model.step();
            assert!((DATA..64 << 20).contains(&page), "{page:#x}");
        }
        assert_eq!(model.counter, 10_000);
    }

    #[test]
    fn sums_continue() {
        let data: Vec<u8> = (0..=255u8).cycle().take(8192).collect();
        assert_eq!(sum(0, &data), sum(sum(0, &data[..4096]), &data[4096..]));
        assert_eq!(sum(0, &[1, 0, 0, 0, 2, 0, 0, 0]), 4);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(Workload::new(1 << 20, 1, 1, 1).is_err());
        assert!(Workload::new(4 << 30, 1, 1, 1).is_err());
        assert!(Workload::new((64 << 20) + 1, 1, 1, 1).is_err());
        assert!(Workload::new(64 << 20, 1, 0, 1).is_err());
        assert!(Workload::new(64 << 20, 1, 1, 0).is_err());
        assert!(Workload::new(64 << 20, 1, 1, 1025).is_err());
        assert!(Workload::new(64 << 20, 1, 1, 1024).is_ok());
    }
}
