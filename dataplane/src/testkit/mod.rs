//! What tests, benchmarks, the fuzz targets and the `ramjet` tool share, behind the `testkit`
//! feature and not part of the embedder's API: deterministic guest [images](image), a toy guest
//! that keeps writing its memory ([`Workload`]), a check that a migration left no file
//! descriptor or thread behind ([`Resources`]), a [relay] that loses a handover message, and
//! [scratch files](scratch_file), and a [real link](netns) between two network namespaces,
//! shaped to a rate.

pub mod image;
mod leaks;
pub mod netns;
pub mod pki;
pub mod relay;
mod workload;

pub use leaks::Resources;
pub use workload::Workload;

/// A read-write regular file of `len` bytes under the temporary directory, already unlinked:
/// gone when dropped. `tag`, the process and the thread name it while it has a name, so that
/// tests running at once never share one.
///
/// # Errors
///
/// Creating, sizing or unlinking the file failed.
pub fn scratch_file(tag: &str, len: u64) -> std::io::Result<std::fs::File> {
    let path = std::env::temp_dir().join(format!(
        "ramjet-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let sized = file.set_len(len);
    std::fs::remove_file(&path)?;
    sized.map(|()| file)
}
