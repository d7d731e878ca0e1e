//! VMM library.
