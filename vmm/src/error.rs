//! What can go wrong in the VMM.

/// Why the VMM could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` cannot be opened (absent, or no permission) or is too old.
    #[error("KVM is not available: {0}")]
    Unavailable(String),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl, in KVM's words.
        what: &'static str,
        /// What the kernel said.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be made or used.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A parameter is out of range.
    #[error("{0}")]
    Config(String),
    /// A device-state blob that this VMM cannot restore.
    #[error("the device state is invalid: {0}")]
    State(String),
    /// The guest stopped on its own (an exit the VMM does not handle, or a halt).
    #[error("the guest stopped: {0}")]
    Guest(String),
}

impl VmmError {
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
        move |source| VmmError::Kvm { what, source }
    }
}
