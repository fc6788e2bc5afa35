//! The retention journal on the retention volume. So far: the recovery
//! point log. Redo/undo logs for point-in-time recovery come next.

pub mod points;
pub mod undo;
