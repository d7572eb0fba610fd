//! What the KVM tests share: the skip, a booted guest, and the check of a guest's memory and
//! state against the host's replay of its workload.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;

use ramjet_dataplane::testkit::image::{self, ImageKind, Rng};
use ramjet_vmm::guest::{self, Model, Workload};
use ramjet_vmm::{LogMode, Machine, Vm, guest_state};

/// The image the data pages start with.
pub const IMAGE: ImageKind = ImageKind::Mixed;
pub const IMAGE_SEED: u64 = 17;

/// Whether KVM can be used here; if not, says why (the test then passes as skipped).
pub fn kvm_or_skip(test: &str) -> bool {
    match ramjet_vmm::kvm_available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("{test}: skipped: {why}");
            false
        }
    }
}

/// A VM of `bytes` with the image in its RAM.
pub fn vm(bytes: u64, mode: LogMode) -> Arc<Vm> {
    let vm = Arc::new(Vm::new(bytes, mode).expect("VM"));
    image::fill(vm.ram(), IMAGE, IMAGE_SEED).expect("image");
    vm
}

/// Dwords a write fills: enough to tell every write apart, few enough that a guest whose
/// instructions KVM emulates (as on a nested PVM host) still dirties tens of thousands of
/// pages a second.
pub const WORDS: u32 = 4;

/// A VM of `bytes` booted with the workload, `grant` pages a batch at `rate` pages a second.
pub fn booted(bytes: u64, grant: u32, rate: Option<u64>) -> (Machine, Workload) {
    let workload = Workload::new(bytes, 0x5eed, grant, WORDS).expect("workload");
    let machine = Machine::boot(vm(bytes, LogMode::ManualClear), workload, rate).expect("boot");
    (machine, workload)
}

/// Replays the workload to the guest's counter and checks, on a paused guest: the generator and
/// the checksum in its memory are the replay's, every data page holds what the replay last
/// wrote there or else the image it started with, and its sum is `sum`. Returns the counter.
pub fn check_against_model(vm: &Vm, workload: Workload, sum: u32) -> u32 {
    let (counter, x, checksum) = guest_state(vm).expect("state");
    let mut model = Model::new(workload);
    let mut written = HashMap::new();
    while model.counter != counter {
        let (page, value) = model.step();
        written.insert(page, value);
    }
    assert_eq!(
        (model.x, model.checksum),
        (x, checksum),
        "the guest's generator and checksum after {counter} pages"
    );
    let ram = vm.ram();
    let mut rng = Rng::new(IMAGE_SEED);
    let mut expected = vec![0u8; 4096];
    let mut actual = vec![0u8; 4096];
    let mut host_sum = 0u32;
    for index in 0..ram.total_pages() {
        image::fill_page(IMAGE, &mut rng, &mut expected);
        let address = index * 4096;
        if address < guest::DATA {
            continue;
        }
        if let Some(value) = written.get(&address) {
            for dword in expected.chunks_exact_mut(4).take(workload.words as usize) {
                dword.copy_from_slice(&value.to_le_bytes());
            }
        }
        ram.read(0, address, &mut actual).expect("read");
        assert!(
            expected == actual,
            "data page {address:#x} is not what the workload left there (written: {:?})",
            written.get(&address)
        );
        host_sum = guest::sum(host_sum, &actual[..workload.words as usize * 4]);
    }
    assert_eq!(host_sum, sum, "the guest's sum of its data pages");
    counter
}
