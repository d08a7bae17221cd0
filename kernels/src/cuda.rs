//! The CUDA backend: the same model and the same tenant guard as [`crate::cpu`],
//! as kernels compiled at start-up by NVRTC for the GPU at hand.
//!
//! - [`nvrtc`]: the kernel sources (`kernels/cuda/*.cu`, embedded) and their
//!   compilation to a cubin, with ptxas's per-kernel report for CI.
//! - [`CudaOps`]: the context, the stream and every op of [`crate::cpu::ops`]
//!   on device buffers ([`DeviceKv`], [`DeviceBatch`]), including the split-K
//!   decode attention and its unguarded benchmark-only twin.
//! - [`CudaBackend`]: [`crate::backend::Backend`] over those ops.
//!
//! cudarc loads libcuda and libnvrtc at run time, so this builds everywhere;
//! [`available`] says whether a GPU can be used, and [`CudaBackend::new`]
//! returns [`crate::backend::BackendError::Unavailable`] where it cannot.

mod backend;
pub mod nvrtc;
mod ops;

pub use self::backend::CudaBackend;
pub use self::ops::{
    CudaOps, DECODE_SHAPES, DecodeLaunch, DecodeScratch, DeviceBatch, DeviceInfo, DeviceKv,
    MAX_PART_TOKENS, decode_bytes, kernel_names,
};

/// Whether a CUDA driver and at least one GPU are present (NVRTC is checked
/// when a backend starts).
pub fn available() -> bool {
    ops::driver_present()
}
