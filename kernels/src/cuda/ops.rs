//! Device buffers and kernel launches: every op of [`crate::cpu::ops`] on the GPU.
//!
//! [`CudaOps`] owns the context, the stream and the compiled kernels; its
//! methods check every length and index the kernels will use against the
//! buffers they are given before launching, so a safe call cannot make a
//! kernel touch memory outside its buffers. Launches are asynchronous on one
//! stream; [`CudaOps::download`] waits for them.
#![allow(unsafe_code)] // kernel launches through the CUDA driver API
#![allow(clippy::many_single_char_names)] // x, w, q, k, v, n, m: the math's own names

use super::nvrtc;
use crate::backend::BackendError;
use crate::cpu::ops::{PagedBatch, TokenIndex};
use crate::layout::KvShape;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    DriverError, LaunchConfig, PushKernelArg, ValidAsZeroBits, sys,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// Threads per CTA of the decode partition kernel (`BH_DEC_THREADS`).
const DECODE_THREADS: u32 = 256;
/// Warps per CTA of the decode partition kernel.
const DECODE_WARPS: usize = 8;
/// Largest partition (`BH_DEC_MAX_BLOCKS` blocks of 16 tokens).
pub const MAX_PART_TOKENS: u32 = 4096;
/// Dynamic shared memory a kernel gets without opting in.
const DEFAULT_SMEM: usize = 48 * 1024;

/// Whether the CUDA driver library is present and sees at least one device.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda by its candidate names; no symbol is called.
    if !unsafe { sys::is_culib_present() } {
        return false;
    }
    CudaContext::device_count().is_ok_and(|n| n > 0)
}

/// The split-K decode shapes (`head_dim`, query heads per KV head) compiled in.
pub const DECODE_SHAPES: [(usize, usize); 12] = [
    (32, 1),
    (32, 2),
    (32, 4),
    (32, 8),
    (64, 1),
    (64, 2),
    (64, 4),
    (64, 8),
    (128, 1),
    (128, 2),
    (128, 4),
    (128, 8),
];

/// The kernels of one split-K decode shape: the partition kernels, then the reduces
/// (guarded first in each pair).
fn decode_kernel_names(hd: usize, group: usize) -> [String; 4] {
    [
        format!("bh_decode_part_h{hd}_g{group}_guard"),
        format!("bh_decode_part_h{hd}_g{group}_noguard"),
        format!("bh_decode_reduce_h{hd}_guard"),
        format!("bh_decode_reduce_h{hd}_noguard"),
    ]
}

/// The kernels loaded at start: all but the split-K decode ones.
fn base_kernel_names() -> Vec<(&'static str, String)> {
    let mut names = Vec::new();
    for epl in [1, 2, 4, 8] {
        for guard in ["guard", "noguard"] {
            names.push(("attention.cu", format!("bh_attn_generic_e{epl}_{guard}")));
        }
    }
    names.push(("attention.cu", "bh_attn_check".to_owned()));
    for k in ["bh_write_kv", "bh_fill_random"] {
        names.push(("kv.cu", k.to_owned()));
    }
    for k in [
        "bh_embed",
        "bh_rms_norm",
        "bh_matmul_nt",
        "bh_rope",
        "bh_swiglu",
        "bh_add_assign",
        "bh_split_qkv",
    ] {
        names.push(("layers.cu", k.to_owned()));
    }
    names
}

/// Every kernel name the sources define, with its source file.
pub fn kernel_names() -> Vec<(&'static str, String)> {
    let mut names = base_kernel_names();
    let mut seen = std::collections::HashSet::new();
    for (hd, g) in DECODE_SHAPES {
        for name in decode_kernel_names(hd, g) {
            if seen.insert(name.clone()) {
                names.push(("attention.cu", name));
            }
        }
    }
    names
}

/// The prelude that builds attention.cu without any split-K decode kernel.
const PRELUDE_NO_DECODE: &str = "#define BH_WANT(HD, G) 0\n#define BH_WANT_HD(HD) 0\n";

/// The prelude that builds attention.cu's split-K decode kernels of one shape only.
fn prelude_decode(hd: usize, group: usize) -> String {
    format!(
        "#define BH_WANT(HD, G) ((HD) == {hd} && (G) == {group})\n\
         #define BH_WANT_HD(HD) ((HD) == {hd})\n#define BH_NO_GENERIC 1\n"
    )
}

/// The loaded kernels of one split-K decode shape.
#[derive(Clone, Debug)]
struct DecodeFns {
    part: [CudaFunction; 2],
    reduce: [CudaFunction; 2],
}

fn dev(what: &'static str) -> impl Fn(DriverError) -> BackendError {
    move |e| BackendError::Device(format!("{what}: {e:?}"))
}

fn invalid(msg: String) -> BackendError {
    BackendError::InvalidBatch(msg)
}

fn check_len(what: &str, have: usize, need: usize) -> Result<(), BackendError> {
    if have < need {
        return Err(invalid(format!(
            "{what}: buffer holds {have} elements, the op needs {need}"
        )));
    }
    Ok(())
}

fn to_u32(what: &str, v: usize) -> Result<u32, BackendError> {
    u32::try_from(v).map_err(|_| {
        invalid(format!(
            "{what} = {v} does not fit the kernels' 32-bit indices"
        ))
    })
}

/// What the device is, read from its attributes.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// The device's name.
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Peak memory clock, kHz.
    pub memory_clock_khz: u32,
    /// Memory bus width, bits.
    pub bus_width_bits: u32,
    /// Largest dynamic shared memory a CTA may opt in to, bytes.
    pub max_smem_optin: u32,
}

impl DeviceInfo {
    /// Peak DRAM bandwidth in bytes/s: memory clock × bus width × 2 (double data rate).
    pub fn peak_bandwidth(&self) -> f64 {
        f64::from(self.memory_clock_khz) * 1e3 * 2.0 * f64::from(self.bus_width_bits) / 8.0
    }

    /// The architecture NVRTC compiles for, `sm_XY`.
    pub fn arch(&self) -> String {
        format!(
            "sm_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }
}

/// The CUDA context, stream and compiled kernels.
#[derive(Debug)]
pub struct CudaOps {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
    decode: Mutex<HashMap<(usize, usize), DecodeFns>>,
    info: DeviceInfo,
    /// Whether decode attention is launched with programmatic dependent launch.
    pdl: bool,
}

/// The KV cache and owner tags in device memory.
#[derive(Debug)]
pub struct DeviceKv {
    shape: KvShape,
    kv: CudaSlice<f32>,
    owners: CudaSlice<u32>,
}

/// A batch's per-sequence and per-token arrays in device memory, validated.
#[derive(Debug)]
pub struct DeviceBatch {
    seqs: usize,
    max_blocks: usize,
    n_tokens: usize,
    ctx_host: Vec<u32>,
    tables_host: Vec<u32>,
    seq_host: Vec<u32>,
    pos_host: Vec<u32>,
    tags: CudaSlice<u32>,
    ctx_lens: CudaSlice<u32>,
    tables: CudaSlice<u32>,
    tok_seq: CudaSlice<u32>,
    tok_pos: CudaSlice<u32>,
    verdict: CudaSlice<u32>,
    unguarded_ok: Option<(usize, usize, bool)>,
}

/// Scratch space of split-K decode (per-partition partial outputs), grown on demand.
#[derive(Debug, Default)]
pub struct DecodeScratch {
    part_acc: Option<CudaSlice<f32>>,
    part_ml: Option<CudaSlice<f32>>,
}

/// How a decode attention call ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLaunch {
    /// Whether the split-K decode kernels ran (false: the generic kernel, for
    /// shapes they do not cover).
    pub split_k: bool,
    /// Tokens per partition.
    pub part_tokens: u32,
    /// Partitions of the longest context (1: no reduce kernel).
    pub parts: u32,
}

impl CudaOps {
    /// Opens device `device`, compiles every kernel for its architecture with
    /// NVRTC and loads them.
    pub fn new(device: usize) -> Result<Self, BackendError> {
        if !driver_present() {
            return Err(BackendError::Unavailable(
                "no CUDA driver (libcuda.so) or no CUDA device on this machine".to_owned(),
            ));
        }
        if !nvrtc::library_present() {
            return Err(BackendError::Unavailable(
                "NVRTC (libnvrtc.so.13) cannot be loaded: install the CUDA toolkit or run \
                 `cargo xtask setup` and put target/nvrtc/nvidia/cu13/lib on LD_LIBRARY_PATH"
                    .to_owned(),
            ));
        }
        let count = CudaContext::device_count().map_err(dev("cuDeviceGetCount"))?;
        if usize::try_from(count).map_or(true, |c| device >= c) {
            return Err(BackendError::Unavailable(format!(
                "CUDA device {device} asked for; this machine has {count}"
            )));
        }
        let ctx = CudaContext::new(device).map_err(dev("creating the CUDA context"))?;
        let attr = |a: sys::CUdevice_attribute| {
            ctx.attribute(a)
                .map(|v| u32::try_from(v).unwrap_or(0))
                .map_err(dev("reading a device attribute"))
        };
        let info = DeviceInfo {
            name: ctx.name().map_err(dev("reading the device name"))?,
            compute_capability: ctx
                .compute_capability()
                .map_err(dev("reading the compute capability"))?,
            sm_count: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            memory_clock_khz: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)?,
            bus_width_bits: attr(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH,
            )?,
            max_smem_optin: attr(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )?,
        };
        let arch = info.arch();
        let mut functions = HashMap::new();
        let names = base_kernel_names();
        for (file, src) in nvrtc::SOURCES {
            let prelude = if file == "attention.cu" {
                PRELUDE_NO_DECODE
            } else {
                ""
            };
            let compiled = nvrtc::compile_with_prelude(file, src, prelude, &arch, false)
                .map_err(|e| BackendError::Device(e.to_string()))?;
            let module = ctx
                .load_module(Ptx::from_binary(compiled.cubin))
                .map_err(dev("loading a compiled module"))?;
            for (_, name) in names.iter().filter(|(f, _)| *f == file) {
                let f = module
                    .load_function(name)
                    .map_err(|e| BackendError::Device(format!("kernel {name} in {file}: {e:?}")))?;
                functions.insert(name.clone(), f);
            }
        }
        // One stream of our own for every op. cudarc's cross-stream event tracking
        // is off: nothing here uses another stream, so stream order is the only
        // synchronisation needed (and launches record no events).
        // SAFETY: called before this context's first allocation; every buffer of these
        // ops is allocated, used and freed on this one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(dev("creating a stream"))?;
        let pdl = info.compute_capability.0 >= 9;
        Ok(Self {
            ctx,
            stream,
            functions,
            decode: Mutex::new(HashMap::new()),
            info,
            pdl,
        })
    }

    /// Compiles and loads the split-K decode kernels of one shape (`head_dim`,
    /// query heads per KV head), if it is one of [`DECODE_SHAPES`] and not
    /// loaded yet; returns whether the shape has split-K kernels. Decode calls
    /// do this on first use; a backend does it at start so its first step is not slow.
    pub fn prepare_decode(&self, head_dim: usize, group: usize) -> Result<bool, BackendError> {
        Ok(self.decode_fns(head_dim, group)?.is_some())
    }

    fn decode_fns(&self, hd: usize, group: usize) -> Result<Option<DecodeFns>, BackendError> {
        if !DECODE_SHAPES.contains(&(hd, group)) {
            return Ok(None);
        }
        let mut cache = self
            .decode
            .lock()
            .map_err(|_| BackendError::Device("decode kernel cache poisoned".to_owned()))?;
        if let Some(f) = cache.get(&(hd, group)) {
            return Ok(Some(f.clone()));
        }
        let (file, src) = nvrtc::SOURCES[0];
        let compiled = nvrtc::compile_with_prelude(
            file,
            src,
            &prelude_decode(hd, group),
            &self.info.arch(),
            false,
        )
        .map_err(|e| BackendError::Device(e.to_string()))?;
        let module = self
            .ctx
            .load_module(Ptx::from_binary(compiled.cubin))
            .map_err(dev("loading a compiled module"))?;
        let load = |name: &String| {
            module
                .load_function(name)
                .map_err(|e| BackendError::Device(format!("kernel {name}: {e:?}")))
        };
        let [pg, pn, rg, rn] = decode_kernel_names(hd, group);
        let fns = DecodeFns {
            part: [load(&pg)?, load(&pn)?],
            reduce: [load(&rg)?, load(&rn)?],
        };
        cache.insert((hd, group), fns.clone());
        Ok(Some(fns))
    }

    /// The device's description.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every op runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for every queued op.
    pub fn synchronize(&self) -> Result<(), BackendError> {
        self.stream
            .synchronize()
            .map_err(dev("synchronizing the stream"))
    }

    /// Lets kernel `f` use `smem` bytes of dynamic shared memory (opting in above 48 KiB).
    fn allow_smem(&self, f: &CudaFunction, smem: usize) -> Result<(), BackendError> {
        if smem > DEFAULT_SMEM {
            if smem > self.info.max_smem_optin as usize {
                return Err(invalid(format!(
                    "a decode launch needs {smem} bytes of shared memory; the device allows {}",
                    self.info.max_smem_optin
                )));
            }
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                i32::try_from(smem).unwrap_or(i32::MAX),
            )
            .map_err(dev("raising the shared memory limit"))?;
        }
        Ok(())
    }

    fn function(&self, name: &str) -> Result<&CudaFunction, BackendError> {
        self.functions
            .get(name)
            .ok_or_else(|| BackendError::Device(format!("kernel {name} was not loaded")))
    }

    /// Copies host data to a new device buffer (an empty slice gives a one-element buffer).
    pub fn upload<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        data: &[T],
    ) -> Result<CudaSlice<T>, BackendError> {
        if data.is_empty() {
            return self.zeros(1);
        }
        self.stream
            .clone_htod(data)
            .map_err(dev("copying to the device"))
    }

    /// Copies host data into an existing device buffer, from its start.
    pub fn upload_into<T: DeviceRepr>(
        &self,
        data: &[T],
        dst: &mut CudaSlice<T>,
    ) -> Result<(), BackendError> {
        check_len("upload destination", dst.len(), data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let mut view = dst.slice_mut(..data.len());
        self.stream
            .memcpy_htod(data, &mut view)
            .map_err(dev("copying to the device"))
    }

    /// A zeroed device buffer of `len` elements (at least one).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, BackendError> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(dev("allocating device memory"))
    }

    /// Copies a device buffer to the host, after every op queued before it.
    pub fn download<T: DeviceRepr>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>, BackendError> {
        self.stream
            .clone_dtoh(buf)
            .map_err(dev("copying from the device"))
    }

    /// Copies the first `len` elements of a device buffer to the host.
    pub fn download_prefix<T: DeviceRepr>(
        &self,
        buf: &CudaSlice<T>,
        len: usize,
    ) -> Result<Vec<T>, BackendError> {
        check_len("download", buf.len(), len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.stream
            .clone_dtoh(&buf.slice(..len))
            .map_err(dev("copying from the device"))
    }

    /// Fills a buffer with reproducible pseudo-random values in `[-1, 1)`.
    pub fn fill_random(&self, buf: &mut CudaSlice<f32>, seed: u32) -> Result<(), BackendError> {
        let n = buf.len() as u64;
        let grid = u32::try_from(n.div_ceil(256).min(1 << 20)).unwrap_or(1 << 20);
        let f = self.function("bh_fill_random")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(buf).arg(&n).arg(&seed);
        // SAFETY: bh_fill_random(float* out, u64 n, u32 seed) writes out[0..n), n = buf.len().
        unsafe { b.launch(cfg1(grid, 256, 0)) }.map_err(dev("bh_fill_random"))?;
        Ok(())
    }

    /// `out[t] = table[tokens[t]]`: `tokens` `[n]`, `table` `[vocab, hidden]`, `out` `[n, hidden]`.
    pub fn embed(
        &self,
        tokens: &CudaSlice<u32>,
        n: usize,
        table: &CudaSlice<f32>,
        vocab: usize,
        hidden: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        check_len("embed tokens", tokens.len(), n)?;
        check_len("embed table", table.len(), vocab * hidden)?;
        check_len("embed out", out.len(), n * hidden)?;
        if n == 0 || hidden == 0 {
            return Ok(());
        }
        let (n32, vocab32, hidden32) = (
            to_u32("tokens", n)?,
            to_u32("vocab", vocab)?,
            to_u32("hidden", hidden)?,
        );
        let f = self.function("bh_embed")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(tokens)
            .arg(table)
            .arg(&vocab32)
            .arg(&hidden32)
            .arg(out)
            .arg(&n32);
        // SAFETY: reads tokens[0..n) and table rows < vocab (checked in the kernel), writes
        // out[0..n*hidden); all three lengths were checked above.
        unsafe { b.launch(cfg1(n32, 256, 0)) }.map_err(dev("bh_embed"))?;
        Ok(())
    }

    /// `out = x / sqrt(mean(x²) + eps) * w`, row by row: `x`, `out` `[rows, d]`, `w` `[d]`.
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        d: usize,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        check_len("rms_norm x", x.len(), rows * d)?;
        check_len("rms_norm w", w.len(), d)?;
        check_len("rms_norm out", out.len(), rows * d)?;
        self.rms_norm_launch(x, None, w, rows, d, eps, out)
    }

    /// RMSNorm of selected rows: `out[r] = rms_norm(x[rows[r]])`; `x` `[x_rows, d]`, `out` `[rows.len(), d]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_rows(
        &self,
        x: &CudaSlice<f32>,
        x_rows: usize,
        rows: &[u32],
        w: &CudaSlice<f32>,
        d: usize,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        check_len("rms_norm x", x.len(), x_rows * d)?;
        check_len("rms_norm w", w.len(), d)?;
        check_len("rms_norm out", out.len(), rows.len() * d)?;
        if let Some(bad) = rows.iter().find(|&&r| r as usize >= x_rows) {
            return Err(invalid(format!("rms_norm row {bad} outside {x_rows} rows")));
        }
        let idx = self.upload(rows)?;
        self.rms_norm_launch(x, Some(&idx), w, rows.len(), d, eps, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn rms_norm_launch(
        &self,
        x: &CudaSlice<f32>,
        idx: Option<&CudaSlice<u32>>,
        w: &CudaSlice<f32>,
        rows: usize,
        d: usize,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        if rows == 0 || d == 0 {
            return Ok(());
        }
        let (rows32, d32) = (to_u32("rows", rows)?, to_u32("d", d)?);
        let null: u64 = 0;
        let f = self.function("bh_rms_norm")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(x);
        match idx {
            Some(idx) => b.arg(idx),
            None => b.arg(&null),
        };
        b.arg(w).arg(&eps).arg(out).arg(&rows32).arg(&d32);
        // SAFETY: one CTA per output row r < rows reads x row idx[r] (or r), each checked by the
        // caller to be a row of x, w[0..d) and writes out row r; lengths checked by the callers.
        unsafe { b.launch(cfg1(rows32, 256, 0)) }.map_err(dev("bh_rms_norm"))?;
        Ok(())
    }

    /// `out = x · wᵀ`: `x` `[n, k]`, `w` `[m, k]`, `out` `[n, m]`.
    pub fn matmul(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        n: usize,
        k: usize,
        m: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        check_len("matmul x", x.len(), n * k)?;
        check_len("matmul w", w.len(), m * k)?;
        check_len("matmul out", out.len(), n * m)?;
        if n == 0 || m == 0 {
            return Ok(());
        }
        let (n32, k32, m32) = (to_u32("n", n)?, to_u32("k", k)?, to_u32("m", m)?);
        let grid_y = n32.div_ceil(64);
        if grid_y > 65_535 {
            return Err(invalid(format!("matmul of {n} rows exceeds the grid")));
        }
        let f = self.function("bh_matmul_nt")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(x).arg(w).arg(out).arg(&n32).arg(&k32).arg(&m32);
        let cfg = LaunchConfig {
            grid_dim: (m32.div_ceil(64), grid_y, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads x[0..n*k), w[0..m*k) and writes out[0..n*m) with every index bounds
        // checked in the kernel against n, k, m, which the lengths above cover.
        unsafe { b.launch(cfg) }.map_err(dev("bh_matmul_nt"))?;
        Ok(())
    }

    /// Rotary embedding in place: `x` `[n, heads, head_dim]`, `positions` `[n]`.
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<u32>,
        n: usize,
        heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<(), BackendError> {
        check_len("rope x", x.len(), n * heads * head_dim)?;
        check_len("rope positions", positions.len(), n)?;
        if n * heads == 0 || head_dim < 2 {
            return Ok(());
        }
        let rows = to_u32("rope rows", n * heads)?;
        let (n32, heads32, hd32) = (
            to_u32("n", n)?,
            to_u32("heads", heads)?,
            to_u32("head_dim", head_dim)?,
        );
        let f = self.function("bh_rope")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(x)
            .arg(positions)
            .arg(&n32)
            .arg(&heads32)
            .arg(&hd32)
            .arg(&theta);
        // SAFETY: CTA r < n*heads rewrites x[r*head_dim..(r+1)*head_dim) and reads positions[r/heads];
        // lengths checked above.
        unsafe { b.launch(cfg1(rows, 128, 0)) }.map_err(dev("bh_rope"))?;
        Ok(())
    }

    /// `out = silu(gate) * up`: `gate_up` `[n, 2 * ffn]`, `out` `[n, ffn]`.
    pub fn swiglu(
        &self,
        gate_up: &CudaSlice<f32>,
        n: usize,
        ffn: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        check_len("swiglu gate_up", gate_up.len(), n * 2 * ffn)?;
        check_len("swiglu out", out.len(), n * ffn)?;
        let total = n * ffn;
        if total == 0 {
            return Ok(());
        }
        let (n32, ffn32) = (to_u32("n", n)?, to_u32("ffn", ffn)?);
        let grid = to_u32("grid", total.div_ceil(256).min(1 << 20))?;
        let f = self.function("bh_swiglu")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(gate_up).arg(&n32).arg(&ffn32).arg(out);
        // SAFETY: reads gate_up[0..n*2*ffn) and writes out[0..n*ffn); lengths checked above.
        unsafe { b.launch(cfg1(grid, 256, 0)) }.map_err(dev("bh_swiglu"))?;
        Ok(())
    }

    /// `x[i] += y[i]` for `i < len`.
    pub fn add_assign(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        len: usize,
    ) -> Result<(), BackendError> {
        check_len("add x", x.len(), len)?;
        check_len("add y", y.len(), len)?;
        if len == 0 {
            return Ok(());
        }
        let len64 = len as u64;
        let grid = to_u32("grid", len.div_ceil(256).min(1 << 20))?;
        let f = self.function("bh_add_assign")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(x).arg(y).arg(&len64);
        // SAFETY: touches x[0..len) and y[0..len); lengths checked above.
        unsafe { b.launch(cfg1(grid, 256, 0)) }.map_err(dev("bh_add_assign"))?;
        Ok(())
    }

    /// Splits `qkv` `[n, q_w + 2 kv_w]` into `q` `[n, q_w]`, `k`, `v` `[n, kv_w]`.
    #[allow(clippy::too_many_arguments)]
    pub fn split_qkv(
        &self,
        qkv: &CudaSlice<f32>,
        n: usize,
        q_w: usize,
        kv_w: usize,
        q: &mut CudaSlice<f32>,
        k: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        check_len("split qkv", qkv.len(), n * (q_w + 2 * kv_w))?;
        check_len("split q", q.len(), n * q_w)?;
        check_len("split k", k.len(), n * kv_w)?;
        check_len("split v", v.len(), n * kv_w)?;
        if n == 0 {
            return Ok(());
        }
        let (n32, qw32, kvw32) = (to_u32("n", n)?, to_u32("q_w", q_w)?, to_u32("kv_w", kv_w)?);
        let f = self.function("bh_split_qkv")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(qkv)
            .arg(&n32)
            .arg(&qw32)
            .arg(&kvw32)
            .arg(q)
            .arg(k)
            .arg(v);
        // SAFETY: CTA t < n reads qkv row t and writes row t of q, k, v; lengths checked above.
        unsafe { b.launch(cfg1(n32, 256, 0)) }.map_err(dev("bh_split_qkv"))?;
        Ok(())
    }

    /// Guarded KV write (`reshape_and_cache`), as [`crate::cpu::ops::write_kv`]:
    /// `k`, `v` `[tokens, kv_heads, head_dim]`, `flags` `[seqs]`.
    pub fn write_kv(
        &self,
        kv: &mut DeviceKv,
        layer: usize,
        batch: &DeviceBatch,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        flags: &mut CudaSlice<u32>,
    ) -> Result<(), BackendError> {
        let shape = kv.shape;
        if layer >= shape.layers {
            return Err(invalid(format!("layer {layer} of {}", shape.layers)));
        }
        let row = shape.kv_heads * shape.head_dim;
        check_len("write_kv k", k.len(), batch.n_tokens * row)?;
        check_len("write_kv v", v.len(), batch.n_tokens * row)?;
        check_len("write_kv flags", flags.len(), batch.seqs)?;
        if batch.n_tokens == 0 {
            return Ok(());
        }
        let g = Geometry::of(&shape, layer)?;
        let n = to_u32("tokens", batch.n_tokens)?;
        let max_blocks = to_u32("max_blocks", batch.max_blocks)?;
        let f = self.function("bh_write_kv")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&mut kv.kv)
            .arg(&kv.owners)
            .arg(&g.num_blocks)
            .arg(&g.layer)
            .arg(&g.layers)
            .arg(&g.kv_heads)
            .arg(&g.head_dim)
            .arg(&g.block_tokens)
            .arg(&batch.tags)
            .arg(&batch.tables)
            .arg(&max_blocks)
            .arg(&batch.tok_seq)
            .arg(&batch.tok_pos)
            .arg(&n)
            .arg(k)
            .arg(v)
            .arg(flags);
        // SAFETY: token t reads its seq/pos (< n_tokens), the table entry it names only if
        // pos / block_tokens < max_blocks (the table holds seqs * max_blocks entries and every
        // token's seq < seqs, checked in DeviceBatch::new), owners[block] only if block <
        // num_blocks, and writes one slot of that block (inside the cache); k and v rows t <
        // n_tokens and flags[seq] are inside the buffers checked above.
        unsafe { b.launch(cfg1(n, 128, 0)) }.map_err(dev("bh_write_kv"))?;
        Ok(())
    }

    /// Guarded paged attention for any tokens (prefill chunks, or decode), as
    /// [`crate::cpu::ops::paged_attention`]: `q`, `out` `[tokens, heads, head_dim]`,
    /// `flags` `[seqs]`. `guard = false` is the benchmark-only twin; it refuses
    /// tables it could read outside of.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        kv: &DeviceKv,
        layer: usize,
        batch: &mut DeviceBatch,
        q: &CudaSlice<f32>,
        heads: usize,
        scale: f32,
        guard: bool,
        out: &mut CudaSlice<f32>,
        flags: &mut CudaSlice<u32>,
    ) -> Result<(), BackendError> {
        let shape = kv.shape;
        check_attention_shape(&shape, layer, heads)?;
        let width = heads * shape.head_dim;
        check_len("attention q", q.len(), batch.n_tokens * width)?;
        check_len("attention out", out.len(), batch.n_tokens * width)?;
        check_len("attention flags", flags.len(), batch.seqs)?;
        if batch.n_tokens == 0 && !guard {
            return Ok(());
        }
        let g = Geometry::of(&shape, layer)?;
        let max_blocks = to_u32("max_blocks", batch.max_blocks)?;
        let n = to_u32("tokens", batch.n_tokens)?;
        let heads32 = to_u32("heads", heads)?;
        if guard {
            let seqs = to_u32("seqs", batch.seqs)?;
            if seqs > 0 {
                let f = self.function("bh_attn_check")?;
                let mut b = self.stream.launch_builder(f);
                b.arg(&kv.owners)
                    .arg(&g.num_blocks)
                    .arg(&g.block_tokens)
                    .arg(&batch.tags)
                    .arg(&batch.ctx_lens)
                    .arg(&batch.tables)
                    .arg(&max_blocks)
                    .arg(&batch.tok_seq)
                    .arg(&batch.tok_pos)
                    .arg(&n)
                    .arg(&mut *flags)
                    .arg(&mut batch.verdict);
                // SAFETY: CTA s < seqs reads table entries i < need only when need <= max_blocks,
                // owners[b] only for b < num_blocks, tokens < n_tokens, and writes flags[s] and
                // verdict[s]; the buffers hold seqs / seqs*max_blocks / n_tokens entries.
                unsafe { b.launch(cfg1(seqs, 256, 0)) }.map_err(dev("bh_attn_check"))?;
            }
        } else {
            batch.check_unguarded(&shape, true)?;
        }
        if batch.n_tokens == 0 {
            return Ok(());
        }
        let epl = shape.head_dim.div_ceil(32).next_power_of_two();
        let name = format!("bh_attn_generic_e{epl}_{}", guard_name(guard));
        let items = batch.n_tokens * heads;
        let grid = to_u32("attention grid", items.div_ceil(4))?;
        let f = self.function(&name)?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&kv.kv)
            .arg(&g.layer)
            .arg(&g.layers)
            .arg(&g.kv_heads)
            .arg(&g.head_dim)
            .arg(&g.block_tokens)
            .arg(&batch.tables)
            .arg(&max_blocks)
            .arg(&batch.tok_seq)
            .arg(&batch.tok_pos)
            .arg(&n)
            .arg(&batch.verdict)
            .arg(q)
            .arg(&heads32)
            .arg(&scale)
            .arg(out);
        // SAFETY: warp (t, h) reads q and writes out row (t, h) (lengths checked above), and K/V
        // of blocks table[s][0..=pos/block_tokens]. Guarded, it runs only when verdict[s] (set by
        // bh_attn_check above, in stream order) says every block of the context is in range and
        // owned by the tag and pos < ctx; unguarded, check_unguarded verified the same ranges on
        // the host.
        unsafe { b.launch(cfg1(grid, 128, 0)) }.map_err(dev("bh_attn_generic"))?;
        Ok(())
    }

    /// The partition size decode uses by default: the largest of 512, 256,
    /// 128, 64 tokens that still gives about one full wave of CTAs (7/8 of
    /// two per SM, the kernel's occupancy). Measured on an H100 (bh-gpu-bench,
    /// 32/8 heads, `head_dim` 128): 512 was the best size from 4k tokens on;
    /// at batch 8 × 1k tokens, 256 (256 CTAs) beat 128 by 2% and halved the
    /// guard's overhead, while 512 left half the SMs idle.
    pub fn auto_part_tokens(&self, seqs: usize, kv_heads: usize, max_ctx: usize) -> u32 {
        let target = 2 * self.info.sm_count as usize * 7 / 8;
        for p in [512u32, 256, 128] {
            if seqs * kv_heads * max_ctx.div_ceil(p as usize) >= target {
                return p;
            }
        }
        64
    }

    /// The partition size (given or automatic, validated) and the number of
    /// partitions of the longest context (at least 1).
    fn partitions(
        &self,
        batch: &DeviceBatch,
        kv_heads: usize,
        part_tokens: Option<u32>,
    ) -> Result<(u32, u32), BackendError> {
        let max_ctx = batch.ctx_host.iter().copied().max().unwrap_or(0) as usize;
        let part =
            part_tokens.unwrap_or_else(|| self.auto_part_tokens(batch.seqs, kv_heads, max_ctx));
        if part == 0 || !part.is_multiple_of(16) || part > MAX_PART_TOKENS {
            return Err(invalid(format!(
                "part_tokens {part}: must be a positive multiple of 16, at most {MAX_PART_TOKENS}"
            )));
        }
        let parts = max_ctx.div_ceil(part as usize).max(1);
        match u32::try_from(parts) {
            Ok(p) if p <= 65_535 => Ok((part, p)),
            _ => Err(invalid(format!("{parts} partitions exceed the grid"))),
        }
    }

    /// Guarded decode attention (one query per sequence at position
    /// `ctx_len - 1`; `batch` must come from [`DeviceBatch::decode`] or have
    /// that shape), split-K: `q`, `out` `[seqs, heads, head_dim]`. Same
    /// results and flags as [`CudaOps::paged_attention`]. Shapes the split-K
    /// kernels do not cover (`head_dim` other than 32/64/128, a group of query
    /// heads per KV head other than 1/2/4/8) run the generic kernel.
    /// `part_tokens`: tokens per partition (a multiple of 16, at most
    /// [`MAX_PART_TOKENS`]); `None` picks [`CudaOps::auto_part_tokens`].
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_decode(
        &self,
        kv: &DeviceKv,
        layer: usize,
        batch: &mut DeviceBatch,
        q: &CudaSlice<f32>,
        heads: usize,
        scale: f32,
        guard: bool,
        out: &mut CudaSlice<f32>,
        flags: &mut CudaSlice<u32>,
        scratch: &mut DecodeScratch,
        part_tokens: Option<u32>,
    ) -> Result<DecodeLaunch, BackendError> {
        let shape = kv.shape;
        check_attention_shape(&shape, layer, heads)?;
        if !batch.is_decode() {
            return Err(invalid(
                "decode attention needs one token per sequence, at position ctx_len - 1".to_owned(),
            ));
        }
        let hd = shape.head_dim;
        let group = heads / shape.kv_heads;
        let fns = if shape.block_tokens == 16 {
            self.decode_fns(hd, group)?
        } else {
            None
        };
        let Some(fns) = fns else {
            self.paged_attention(kv, layer, batch, q, heads, scale, guard, out, flags)?;
            return Ok(DecodeLaunch {
                split_k: false,
                part_tokens: 0,
                parts: 0,
            });
        };
        check_len("decode q", q.len(), batch.seqs * heads * hd)?;
        check_len("decode out", out.len(), batch.seqs * heads * hd)?;
        check_len("decode flags", flags.len(), batch.seqs)?;
        if !guard {
            batch.check_unguarded(&shape, false)?;
        }
        let (part, parts32) = self.partitions(batch, shape.kv_heads, part_tokens)?;
        let parts = parts32 as usize;
        let direct = u32::from(parts == 1);
        let seqs = to_u32("seqs", batch.seqs)?;
        if seqs == 0 {
            return Ok(DecodeLaunch {
                split_k: true,
                part_tokens: part,
                parts: parts32,
            });
        }
        let heads32 = to_u32("heads", heads)?;
        let kv_heads32 = to_u32("kv_heads", shape.kv_heads)?;
        let (part_acc, part_ml) =
            scratch.buffers(self, direct == 1, batch.seqs * heads * parts, hd)?;
        let g = Geometry::of(&shape, layer)?;
        let max_blocks = to_u32("max_blocks", batch.max_blocks)?;
        let smem = (group * part as usize).max(DECODE_WARPS * group * hd) * 4;
        let f = &fns.part[usize::from(!guard)];
        self.allow_smem(f, smem)?;
        let launch = PartLaunch {
            grid: (seqs, kv_heads32, parts32),
            smem: u32::try_from(smem).unwrap_or(u32::MAX),
            scalars: [
                g.num_blocks,
                g.layer,
                g.layers,
                kv_heads32,
                max_blocks,
                heads32,
                part,
                direct,
                parts32,
            ],
            scale,
        };
        self.launch_decode_part(f, &launch, kv, batch, q, out, part_acc, part_ml, flags)?;
        if direct == 0 {
            let reduce = Reduce {
                function: &fns.reduce[usize::from(!guard)],
                part_tokens: part,
                parts: parts32,
                seqs,
                heads: heads32,
            };
            self.launch_decode_reduce(&reduce, &batch.ctx_lens, part_acc, part_ml, out, flags)?;
        }
        Ok(DecodeLaunch {
            split_k: true,
            part_tokens: part,
            parts: parts32,
        })
    }

    /// The first decode kernel, with its parameters in the kernel's order.
    #[allow(clippy::too_many_arguments)]
    fn launch_decode_part(
        &self,
        f: &CudaFunction,
        launch: &PartLaunch,
        kv: &DeviceKv,
        batch: &DeviceBatch,
        q: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        part_acc: &mut CudaSlice<f32>,
        part_ml: &mut CudaSlice<f32>,
        flags: &mut CudaSlice<u32>,
    ) -> Result<(), BackendError> {
        {
            let st = &self.stream;
            let (mut a_kv, _r0) = kv.kv.device_ptr(st);
            let (mut a_owners, _r1) = kv.owners.device_ptr(st);
            let (mut a_tags, _r2) = batch.tags.device_ptr(st);
            let (mut a_ctx, _r3) = batch.ctx_lens.device_ptr(st);
            let (mut a_tables, _r4) = batch.tables.device_ptr(st);
            let (mut a_q, _r5) = q.device_ptr(st);
            let (mut a_out, _w0) = out.device_ptr_mut(st);
            let (mut a_acc, _w1) = part_acc.device_ptr_mut(st);
            let (mut a_ml, _w2) = part_ml.device_ptr_mut(st);
            let (mut a_flags, _w3) = flags.device_ptr_mut(st);
            let mut u = launch.scalars;
            let mut scale = launch.scale;
            let [u0, u1, u2, u3, u4, u5, u6, u7, u8] =
                u.each_mut().map(|v| std::ptr::from_mut(v).cast::<c_void>());
            // The kernel's parameters, in order, each as a pointer to its value.
            let mut params: [*mut c_void; 20] = [
                (&raw mut a_kv).cast(),
                (&raw mut a_owners).cast(),
                u0,
                u1,
                u2,
                u3,
                (&raw mut a_tags).cast(),
                (&raw mut a_ctx).cast(),
                (&raw mut a_tables).cast(),
                u4,
                (&raw mut a_q).cast(),
                u5,
                (&raw mut scale).cast(),
                u6,
                u7,
                (&raw mut a_out).cast(),
                (&raw mut a_acc).cast(),
                (&raw mut a_ml).cast(),
                u8,
                (&raw mut a_flags).cast(),
            ];
            let cfg = LaunchConfig {
                grid_dim: launch.grid,
                block_dim: (DECODE_THREADS, 1, 1),
                shared_mem_bytes: launch.smem,
            };
            // SAFETY: the parameters match bh_decode_part_*'s signature one for one (device
            // pointers as CUdeviceptr, u32 scalars, the f32 scale), and every value lives
            // until the launch returns. CTA (s, kvh, p) reads q and (direct) writes out rows
            // s*heads + kvh*group ..+group (inside [seqs, heads, head_dim], checked by the caller),
            // reads table entries of its partition (< need <= max_blocks: guarded, checked in
            // the kernel before the loads; unguarded, check_unguarded verified it) and K/V of
            // those blocks only after they are checked (< num_blocks and owned, or verified on
            // the host); partial results go to index ((s*heads + h)*parts + p) of scratch
            // buffers sized seqs*heads*parts*(head_dim | 2); shared memory is sized for
            // max(group * part, 8 * group * head_dim) floats. Launched with programmatic
            // dependent launch, it reads nothing a previous kernel writes before its
            // griddepcontrol.wait.
            unsafe { self.launch_pdl(f, cfg, &mut params) }
        }
    }

    /// Launches `f` on the stream, with programmatic dependent launch where the
    /// device has it (compute capability 9.0 and up): the kernel may begin while
    /// the previous kernel finishes, and must wait (`griddepcontrol.wait`) before
    /// reading anything that kernel writes.
    ///
    /// # Safety
    ///
    /// `params` must point at values matching `f`'s parameters, alive until this
    /// returns, and the kernel must stay inside the buffers they name; a kernel
    /// launched this way must not read what a previous kernel writes before its wait.
    unsafe fn launch_pdl(
        &self,
        f: &CudaFunction,
        cfg: LaunchConfig,
        params: &mut [*mut c_void],
    ) -> Result<(), BackendError> {
        self.ctx
            .bind_to_thread()
            .map_err(dev("binding the context"))?;
        // SAFETY: a plain C struct (an id, padding and a union of integers); all-zero is valid.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &raw mut attr,
            numAttrs: u32::from(self.pdl),
        };
        // SAFETY: `config` and `attr` are live locals; the caller vouches for `params`.
        unsafe {
            sys::cuLaunchKernelEx(
                &raw const config,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(dev("cuLaunchKernelEx"))
    }

    /// The second decode kernel: combines the partitions of every (sequence, head).
    fn launch_decode_reduce(
        &self,
        r: &Reduce<'_>,
        ctx_lens: &CudaSlice<u32>,
        part_acc: &CudaSlice<f32>,
        part_ml: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        flags: &mut CudaSlice<u32>,
    ) -> Result<(), BackendError> {
        self.allow_smem(r.function, r.parts as usize * 4)?;
        let mut b = self.stream.launch_builder(r.function);
        b.arg(ctx_lens)
            .arg(&r.part_tokens)
            .arg(part_acc)
            .arg(part_ml)
            .arg(&r.parts)
            .arg(&r.heads)
            .arg(out)
            .arg(flags);
        let cfg = LaunchConfig {
            grid_dim: (r.seqs, r.heads, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: r.parts * 4,
        };
        // SAFETY: CTA (s, h) reads the ceil(ctx/part) <= parts partitions of (s, h) that the
        // partition kernel wrote before it in stream order (scratch sized seqs*heads*parts*
        // (head_dim | 2) by the caller), writes out row (s, h) of [seqs, heads, head_dim] and
        // flags[s]; shared memory holds one float per partition.
        unsafe { b.launch(cfg) }.map_err(dev("bh_decode_reduce"))?;
        Ok(())
    }
}

/// The partition kernel's launch: grid, shared memory and scalar parameters
/// (`num_blocks, layer, layers, kv_heads, max_blocks, heads, part_tokens, direct, parts`).
struct PartLaunch {
    grid: (u32, u32, u32),
    smem: u32,
    scalars: [u32; 9],
    scale: f32,
}

/// The reduce launch: its kernel and shape.
struct Reduce<'a> {
    function: &'a CudaFunction,
    part_tokens: u32,
    parts: u32,
    seqs: u32,
    heads: u32,
}

fn guard_name(guard: bool) -> &'static str {
    if guard { "guard" } else { "noguard" }
}

fn cfg1(grid: u32, block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}

fn check_attention_shape(shape: &KvShape, layer: usize, heads: usize) -> Result<(), BackendError> {
    if layer >= shape.layers {
        return Err(invalid(format!("layer {layer} of {}", shape.layers)));
    }
    if shape.kv_heads == 0 || heads == 0 || !heads.is_multiple_of(shape.kv_heads) {
        return Err(invalid(format!(
            "{heads} query heads over {} KV heads",
            shape.kv_heads
        )));
    }
    if shape.head_dim == 0 || shape.head_dim > 256 {
        return Err(invalid(format!(
            "head_dim {} (at most 256)",
            shape.head_dim
        )));
    }
    Ok(())
}

/// The cache geometry as the kernels take it.
struct Geometry {
    num_blocks: u32,
    layer: u32,
    layers: u32,
    kv_heads: u32,
    head_dim: u32,
    block_tokens: u32,
}

impl Geometry {
    fn of(shape: &KvShape, layer: usize) -> Result<Self, BackendError> {
        Ok(Self {
            num_blocks: to_u32("num_blocks", shape.num_blocks)?,
            layer: to_u32("layer", layer)?,
            layers: to_u32("layers", shape.layers)?,
            kv_heads: to_u32("kv_heads", shape.kv_heads)?,
            head_dim: to_u32("head_dim", shape.head_dim)?,
            block_tokens: to_u32("block_tokens", shape.block_tokens)?,
        })
    }
}

impl DeviceKv {
    /// A zeroed cache of `shape` with every block free (`FREE_TAG`).
    pub fn new(ops: &CudaOps, shape: KvShape) -> Result<Self, BackendError> {
        if shape.block_tokens == 0 || shape.num_blocks == 0 {
            return Err(invalid(
                "a KV cache needs blocks of at least one token".to_owned(),
            ));
        }
        to_u32("num_blocks", shape.num_blocks)?;
        Ok(Self {
            shape,
            kv: ops.zeros(shape.total_elems())?,
            owners: ops.zeros(shape.num_blocks)?,
        })
    }

    /// Its shape.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Sets the owner tags of blocks `first .. first + tags.len()`.
    pub fn set_owners(
        &mut self,
        ops: &CudaOps,
        first: usize,
        tags: &[u32],
    ) -> Result<(), BackendError> {
        if first + tags.len() > self.shape.num_blocks {
            return Err(invalid(format!(
                "owner tags for blocks {first}..{} outside the pool of {}",
                first + tags.len(),
                self.shape.num_blocks
            )));
        }
        if tags.is_empty() {
            return Ok(());
        }
        let mut view = self.owners.slice_mut(first..first + tags.len());
        ops.stream
            .memcpy_htod(tags, &mut view)
            .map_err(dev("copying owner tags"))
    }

    /// The owner tags, copied to the host.
    pub fn owners(&self, ops: &CudaOps) -> Result<Vec<u32>, BackendError> {
        ops.download_prefix(&self.owners, self.shape.num_blocks)
    }

    /// Replaces the whole cache's contents (`shape.total_elems()` floats).
    pub fn upload(&mut self, ops: &CudaOps, data: &[f32]) -> Result<(), BackendError> {
        if data.len() != self.shape.total_elems() {
            return Err(invalid(format!(
                "cache upload of {} floats, the cache holds {}",
                data.len(),
                self.shape.total_elems()
            )));
        }
        ops.upload_into(data, &mut self.kv)
    }

    /// The whole cache, copied to the host.
    pub fn download(&self, ops: &CudaOps) -> Result<Vec<f32>, BackendError> {
        ops.download_prefix(&self.kv, self.shape.total_elems())
    }

    /// Fills the whole cache with reproducible pseudo-random values (benchmarks).
    pub fn fill_random(&mut self, ops: &CudaOps, seed: u32) -> Result<(), BackendError> {
        ops.fill_random(&mut self.kv, seed)
    }

    fn block_range(&self, block: u32) -> Result<std::ops::Range<usize>, BackendError> {
        let b = block as usize;
        if b >= self.shape.num_blocks {
            return Err(invalid(format!(
                "block {block} outside the pool of {}",
                self.shape.num_blocks
            )));
        }
        let n = self.shape.block_elems();
        Ok(b * n..(b + 1) * n)
    }

    /// Zeroes every byte of one block (all layers, K and V), in stream order.
    pub fn scrub(&mut self, ops: &CudaOps, block: u32) -> Result<(), BackendError> {
        let range = self.block_range(block)?;
        let mut view = self.kv.slice_mut(range);
        ops.stream
            .memset_zeros(&mut view)
            .map_err(dev("scrubbing a block"))
    }

    /// Writes `value` into every element of one block (tests of scrubbing).
    pub fn fill_block(
        &mut self,
        ops: &CudaOps,
        block: u32,
        value: f32,
    ) -> Result<(), BackendError> {
        let range = self.block_range(block)?;
        let data = vec![value; range.len()];
        let mut view = self.kv.slice_mut(range);
        ops.stream
            .memcpy_htod(&data, &mut view)
            .map_err(dev("filling a block"))
    }

    /// One block's memory, copied to the host.
    pub fn read_block(&self, ops: &CudaOps, block: u32) -> Result<Vec<f32>, BackendError> {
        let range = self.block_range(block)?;
        ops.stream
            .clone_dtoh(&self.kv.slice(range))
            .map_err(dev("reading a block"))
    }
}

impl DeviceBatch {
    /// Uploads and validates a batch: `tags` and `ctx_lens` of one length
    /// (the sequences), `block_tables` of `seqs * max_blocks` entries, and
    /// tokens whose sequence index is below `seqs`.
    pub fn new(
        ops: &CudaOps,
        batch: &PagedBatch<'_>,
        tokens: &TokenIndex<'_>,
    ) -> Result<Self, BackendError> {
        let seqs = batch.tags.len();
        if batch.ctx_lens.len() != seqs {
            return Err(invalid(format!(
                "{seqs} tags but {} context lengths",
                batch.ctx_lens.len()
            )));
        }
        if batch.block_tables.len() != seqs * batch.max_blocks {
            return Err(invalid(format!(
                "block tables hold {} entries, {seqs} sequences x {} expected",
                batch.block_tables.len(),
                batch.max_blocks
            )));
        }
        if tokens.seq.len() != tokens.pos.len() {
            return Err(invalid(
                "token sequence and position arrays differ in length".to_owned(),
            ));
        }
        if let Some(bad) = tokens.seq.iter().find(|&&s| s as usize >= seqs) {
            return Err(invalid(format!(
                "token of sequence {bad}; the batch has {seqs}"
            )));
        }
        to_u32("seqs", seqs)?;
        to_u32("tokens", tokens.seq.len())?;
        Ok(Self {
            seqs,
            max_blocks: batch.max_blocks,
            n_tokens: tokens.seq.len(),
            ctx_host: batch.ctx_lens.to_vec(),
            tables_host: batch.block_tables.to_vec(),
            seq_host: tokens.seq.to_vec(),
            pos_host: tokens.pos.to_vec(),
            tags: ops.upload(batch.tags)?,
            ctx_lens: ops.upload(batch.ctx_lens)?,
            tables: ops.upload(batch.block_tables)?,
            tok_seq: ops.upload(tokens.seq)?,
            tok_pos: ops.upload(tokens.pos)?,
            verdict: ops.zeros(seqs)?,
            unguarded_ok: None,
        })
    }

    /// A decode batch: one query per sequence, at position `ctx_len - 1`.
    pub fn decode(ops: &CudaOps, batch: &PagedBatch<'_>) -> Result<Self, BackendError> {
        let seq: Vec<u32> = (0..batch.tags.len())
            .map(|s| to_u32("seqs", s))
            .collect::<Result<_, _>>()?;
        let pos: Vec<u32> = batch.ctx_lens.iter().map(|c| c.wrapping_sub(1)).collect();
        Self::new(
            ops,
            batch,
            &TokenIndex {
                seq: &seq,
                pos: &pos,
            },
        )
    }

    /// Sequences.
    pub fn seqs(&self) -> usize {
        self.seqs
    }

    /// Tokens.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Whether the batch is a decode batch (token `i` is sequence `i`'s query at `ctx_len - 1`).
    pub fn is_decode(&self) -> bool {
        self.n_tokens == self.seqs
            && self
                .seq_host
                .iter()
                .zip(&self.pos_host)
                .enumerate()
                .all(|(i, (&s, &p))| s as usize == i && p == self.ctx_host[i].wrapping_sub(1))
    }

    /// For the unguarded twins: every table entry the kernels will read must
    /// exist and name a block inside the pool (ownership is what is not checked).
    /// The verdict is kept for the pool it was made against, so repeated calls
    /// (benchmarks) pay for the scan once.
    fn check_unguarded(&mut self, shape: &KvShape, tokens: bool) -> Result<(), BackendError> {
        let key = (shape.num_blocks, shape.block_tokens, tokens);
        if self.unguarded_ok == Some(key) {
            return Ok(());
        }
        let bt = shape.block_tokens;
        let mut need = vec![0usize; self.seqs];
        for (s, n) in need.iter_mut().enumerate() {
            *n = (self.ctx_host[s] as usize).div_ceil(bt);
        }
        if tokens {
            for (&s, &p) in self.seq_host.iter().zip(&self.pos_host) {
                if p >= self.ctx_host[s as usize] {
                    return Err(invalid(format!(
                        "unguarded attention: position {p} of sequence {s} is past its context"
                    )));
                }
            }
        }
        for (s, &n) in need.iter().enumerate() {
            if n > self.max_blocks {
                return Err(invalid(format!(
                    "unguarded attention: sequence {s} needs {n} blocks, the table holds {}",
                    self.max_blocks
                )));
            }
            let row = &self.tables_host[s * self.max_blocks..][..n];
            if let Some(bad) = row.iter().find(|&&b| b as usize >= shape.num_blocks) {
                return Err(invalid(format!(
                    "unguarded attention: sequence {s} names block {bad} outside the pool"
                )));
            }
        }
        self.unguarded_ok = Some(key);
        Ok(())
    }
}

impl DecodeScratch {
    /// Empty; grown by the first decode that needs it.
    pub fn new() -> Self {
        Self::default()
    }

    /// The partial-output buffers for `rows` (sequence, head, partition) rows of
    /// `head_dim` floats (one element each when `direct`: the kernel writes none).
    fn buffers(
        &mut self,
        ops: &CudaOps,
        direct: bool,
        rows: usize,
        head_dim: usize,
    ) -> Result<(&mut CudaSlice<f32>, &mut CudaSlice<f32>), BackendError> {
        let (acc, ml) = if direct {
            (1, 1)
        } else {
            (rows * head_dim, rows * 2)
        };
        self.ensure(ops, acc, ml)?;
        match (self.part_acc.as_mut(), self.part_ml.as_mut()) {
            (Some(a), Some(m)) => Ok((a, m)),
            _ => Err(BackendError::Device(
                "decode scratch was not allocated".to_owned(),
            )),
        }
    }

    fn ensure(&mut self, ops: &CudaOps, acc: usize, ml: usize) -> Result<(), BackendError> {
        if self.part_acc.as_ref().is_none_or(|b| b.len() < acc) {
            self.part_acc = Some(ops.zeros(acc)?);
        }
        if self.part_ml.as_ref().is_none_or(|b| b.len() < ml) {
            self.part_ml = Some(ops.zeros(ml)?);
        }
        Ok(())
    }
}

/// Bytes the decode kernels must move for one call: K and V of every
/// sequence's context, the queries and the outputs.
pub fn decode_bytes(shape: &KvShape, heads: usize, ctx_lens: &[u32]) -> u64 {
    let per_token = 2 * shape.kv_heads * shape.head_dim * 4;
    let kv: u64 = ctx_lens
        .iter()
        .map(|&c| u64::from(c) * per_token as u64)
        .sum();
    kv + 2 * (ctx_lens.len() * heads * shape.head_dim * 4) as u64
}
