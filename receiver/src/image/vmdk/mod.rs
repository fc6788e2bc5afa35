//! VMDK images. So far: descriptors for flat extents (`monolithicFlat` for
//! hosted products and qemu, `vmfs` for ESXi), used to export a disk as a
//! flat VMDK whose `ddb.uuid` is the disk's identity.

pub mod descriptor;
pub mod flat;
