//! Making a point consistent: freezing the filesystems on the protected
//! disks (all of them in the same cut) and running the operator's pre/post
//! scripts for app-consistent points; and telling the operator when a
//! point is held back.

pub mod freeze;
pub mod held;
pub mod scripts;
