//! The retention journal on the retention volume: the recovery point log,
//! the undo segments that rebuild every point, and the retention rules
//! that decide how much of them stays (docs/JOURNAL.md).

pub mod append;
pub mod points;
pub mod ranges;
pub mod retention;
pub mod thinning;
pub mod undo;
