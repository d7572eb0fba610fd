//! A fixed set of reusable objects (frame and lz4 buffers) that circulate over a channel: taken
//! by producers, given back by consumers. Nothing is allocated after start-up; a buffer keeps
//! the capacity it grew to.

use crossbeam_channel::{Receiver, Sender};

/// The pool; clones share it.
#[derive(Debug)]
pub(crate) struct Pool<T> {
    give: Sender<T>,
    take: Receiver<T>,
}

impl<T> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Pool {
            give: self.give.clone(),
            take: self.take.clone(),
        }
    }
}

impl<T> Pool<T> {
    /// A pool of these objects.
    pub(crate) fn new(items: Vec<T>) -> Self {
        let (give, take) = crossbeam_channel::bounded(items.len());
        for item in items {
            let _ = give.send(item);
        }
        Pool { give, take }
    }

    /// Takes an object, waiting for one to come back if all are in use; `None` only if the
    /// pool is broken (it holds its own sender, so it never is).
    pub(crate) fn take(&self) -> Option<T> {
        self.take.recv().ok()
    }

    /// Gives an object back.
    pub(crate) fn give(&self, item: T) {
        let _ = self.give.try_send(item);
    }
}

/// The allocation of `v`, emptied, for elements of another type of the same layout: a list of
/// slices rebuilt for every write or read with a new lifetime, without allocating. (Collecting
/// an emptied `Vec` reuses its allocation when the layouts match, which std does in practice
/// but does not promise; `recycled_vectors_keep_their_allocation` checks it.)
pub(crate) fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector was emptied"))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::IoSliceMut;

    use super::*;

    #[test]
    fn recycled_vectors_keep_their_allocation() {
        let bytes = [1u8; 4];
        let mut slices: Vec<&[u8]> = Vec::with_capacity(64);
        slices.push(&bytes);
        let (at, capacity) = (slices.as_ptr().cast::<u8>(), slices.capacity());
        let again: Vec<&[u8]> = recycle(slices);
        assert!(again.is_empty());
        assert_eq!(
            (again.as_ptr().cast::<u8>(), again.capacity()),
            (at, capacity)
        );
        let mut buf = [0u8; 8];
        let mut iov: Vec<IoSliceMut<'_>> = Vec::with_capacity(1025);
        iov.push(IoSliceMut::new(&mut buf));
        let (at, capacity) = (iov.as_ptr().cast::<u8>(), iov.capacity());
        let again: Vec<IoSliceMut<'static>> = recycle(iov);
        assert_eq!(
            (again.as_ptr().cast::<u8>(), again.capacity()),
            (at, capacity)
        );
    }

    #[test]
    fn objects_circulate_and_keep_their_capacity() {
        let pool = Pool::new(vec![Vec::<u8>::with_capacity(16), Vec::with_capacity(16)]);
        let mut a = pool.take().unwrap();
        let b = pool.take().unwrap();
        a.extend_from_slice(&[1; 100]);
        let grown = a.capacity();
        pool.give(a);
        pool.give(b);
        let first = pool.take().unwrap();
        assert_eq!(
            first.capacity(),
            grown,
            "the first given back comes out first"
        );
        assert!(pool.clone().take().is_some(), "clones share the objects");
    }
}
