//! The one way the host takes its `std` mutexes.
//!
//! Every lock in the host guards updates that are single steps (a push, a
//! retain, an insert, an assignment), so a panic while one is held cannot
//! leave its data half-changed, and a poisoned lock is taken as it is.

use std::sync::{Mutex, MutexGuard, PoisonError};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
