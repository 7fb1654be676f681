//! Large buffers backed by transparent huge pages.
//!
//! Filling fresh memory costs one page fault per 4 KiB page: for the hundreds of MB that a pack
//! writes, or the tokens a radix index stores, those faults cost more than the writes. On Linux,
//! where transparent huge pages are enabled (`always` or `madvise`), advising a buffer before it
//! is first written makes the kernel fault it in 2 MiB at a time. It is only a hint: where it is
//! refused or unsupported, nothing changes.

/// Buffers smaller than this are not advised (they would gain at most a partial huge page).
const MIN_BYTES: usize = 4 << 20;

/// An empty `Vec` with room for `capacity` elements, advised to use huge pages if it is large.
pub(crate) fn huge_vec<T>(capacity: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(capacity);
    advise_huge_pages(&mut v);
    v
}

/// Advise the unused capacity of `v` (the part not written yet) to use huge pages.
#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(crate) fn advise_huge_pages<T>(v: &mut Vec<T>) {
    const PAGE: usize = 4 << 10;
    const MADV_HUGEPAGE: i32 = 14;
    unsafe extern "C" {
        fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
    }
    let spare = v.spare_capacity_mut();
    let start = spare.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(spare);
    // Whole pages inside the buffer only.
    let (first, last) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
    if last >= first + MIN_BYTES {
        // SAFETY: MADV_HUGEPAGE changes neither the contents nor the protection of any memory,
        // and the range lies inside this Vec's allocation.
        unsafe {
            madvise(first as *mut std::ffi::c_void, last - first, MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64"))))]
pub(crate) fn advise_huge_pages<T>(_v: &mut Vec<T>) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_vecs_are_ordinary_vecs() {
        for n in [0, 10, 3 << 20] {
            let mut v: Vec<u32> = huge_vec(n);
            assert!(v.is_empty() && v.capacity() >= n);
            v.extend(0..n as u32);
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
        }
    }
}
