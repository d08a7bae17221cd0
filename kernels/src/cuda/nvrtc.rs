//! Compiling the kernel sources with NVRTC, and reading ptxas's report.
//!
//! The sources live in `kernels/cuda/` and are embedded in the binary. Each
//! `.cu` file is compiled on its own, with `common.cuh` prepended (NVRTC has
//! no system headers and the files include nothing). [`compile`] asks NVRTC
//! for a cubin of one architecture (e.g. `sm_90`) and, when `verbose`, for
//! ptxas's per-kernel report, which [`parse_ptxas_log`] turns into registers,
//! stack frame and spill bytes: CI fails on any spill.
//!
//! NVRTC is loaded at run time (cudarc's dynamic loading): without it,
//! [`library_present`] is false and [`compile`] returns an error instead of
//! panicking.
#![allow(unsafe_code)] // NVRTC's C API: program handles and output buffers.

use cudarc::nvrtc::{result, sys};
use std::ffi::{CString, c_char};
use std::fmt;

/// `kernels/cuda/common.cuh`, prepended to every source.
pub const COMMON: &str = include_str!("../../cuda/common.cuh");

/// Every kernel source, by file name.
pub const SOURCES: [(&str, &str); 3] = [
    ("attention.cu", include_str!("../../cuda/attention.cu")),
    ("kv.cu", include_str!("../../cuda/kv.cu")),
    ("layers.cu", include_str!("../../cuda/layers.cu")),
];

/// Options every compile gets, besides the architecture.
const BASE_OPTIONS: [&str; 1] = ["--std=c++17"];

/// Whether the NVRTC shared library can be loaded (cudarc panics on first use otherwise).
pub fn library_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names; no symbol is called.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's version, `(major, minor)`; `None` without the library.
pub fn version() -> Option<(i32, i32)> {
    if !library_present() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; both pointers are to live locals.
    unsafe { sys::nvrtcVersion(&raw mut major, &raw mut minor) }
        .result()
        .ok()?;
    Some((major, minor))
}

/// A compiled source file.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The source file's name.
    pub name: String,
    /// The cubin for the architecture asked for.
    pub cubin: Vec<u8>,
    /// NVRTC's log (ptxas's report when compiled with `verbose`).
    pub log: String,
}

/// Why a compile failed.
#[derive(Clone, Debug)]
pub struct CompileFailure {
    /// The source file's name.
    pub name: String,
    /// What failed.
    pub what: String,
    /// NVRTC's log.
    pub log: String,
}

impl fmt::Display for CompileFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NVRTC: {}: {}", self.name, self.what)?;
        if !self.log.trim().is_empty() {
            write!(f, "\n{}", self.log.trim_end())?;
        }
        Ok(())
    }
}

impl std::error::Error for CompileFailure {}

/// The full text NVRTC compiles for one source: `prelude` (macro definitions
/// that select what to build), `common.cuh`, then the file.
pub fn full_source(prelude: &str, source: &str) -> String {
    format!("{prelude}\n{COMMON}\n#line 1\n{source}")
}

/// Compiles one source (without `common.cuh`; it is prepended) to a cubin for
/// `arch` (e.g. `"sm_90"`). With `verbose`, ptxas reports on every kernel in the log.
pub fn compile(
    name: &str,
    source: &str,
    arch: &str,
    verbose: bool,
) -> Result<Compiled, CompileFailure> {
    compile_with_prelude(name, source, "", arch, verbose)
}

/// [`compile`], with `prelude` (e.g. `#define` lines) before `common.cuh`.
pub fn compile_with_prelude(
    name: &str,
    source: &str,
    prelude: &str,
    arch: &str,
    verbose: bool,
) -> Result<Compiled, CompileFailure> {
    let fail = |what: String, log: String| CompileFailure {
        name: name.to_owned(),
        what,
        log,
    };
    if !library_present() {
        return Err(fail(
            "the NVRTC library (libnvrtc.so.13) cannot be loaded; run `cargo xtask setup` and put \
             target/nvrtc/nvidia/cu13/lib on LD_LIBRARY_PATH (or install the CUDA toolkit)"
                .to_owned(),
            String::new(),
        ));
    }
    let src = CString::new(full_source(prelude, source))
        .map_err(|e| fail(format!("source has a NUL: {e}"), String::new()))?;
    let cname =
        CString::new(name).map_err(|e| fail(format!("name has a NUL: {e}"), String::new()))?;
    let prog = result::create_program(&src, Some(&cname))
        .map_err(|e| fail(format!("nvrtcCreateProgram: {e:?}"), String::new()))?;
    let program = Program(prog);
    let mut options: Vec<String> = BASE_OPTIONS.iter().map(|&o| o.to_owned()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    if verbose {
        options.push("--ptxas-options=-v".to_owned());
    }
    // SAFETY: `program.0` was created above and is destroyed only by `Program`'s drop.
    let compiled = unsafe { result::compile_program(program.0, &options) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(program.0) }
        .map(|raw| c_chars_to_string(&raw))
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(fail(
            format!("compile failed ({e:?}) with {options:?}"),
            log,
        ));
    }
    let mut size = 0usize;
    // SAFETY: as above; `size` is a live local.
    unsafe { sys::nvrtcGetCUBINSize(program.0, &raw mut size) }
        .result()
        .map_err(|e| fail(format!("nvrtcGetCUBINSize: {e:?}"), log.clone()))?;
    if size == 0 {
        return Err(fail(
            format!("no cubin produced for {arch} (is it a real architecture, sm_XY?)"),
            log,
        ));
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has exactly the `size` bytes NVRTC reported for this program.
    unsafe { sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(|e| fail(format!("nvrtcGetCUBIN: {e:?}"), log.clone()))?;
    Ok(Compiled {
        name: name.to_owned(),
        cubin,
        log,
    })
}

/// Compiles every source in [`SOURCES`] for `arch`.
pub fn compile_all(arch: &str, verbose: bool) -> Result<Vec<Compiled>, CompileFailure> {
    SOURCES
        .iter()
        .map(|(name, src)| compile(name, src, arch, verbose))
        .collect()
}

/// Owns an NVRTC program handle.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from nvrtcCreateProgram and is destroyed once, here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    #[allow(clippy::cast_sign_loss)] // c_char is a byte
    let bytes: Vec<u8> = raw
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// What ptxas reported for one kernel (or for a device function it calls).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelReport {
    /// The function's name.
    pub name: String,
    /// Whether it is a kernel (an entry function) rather than a called device function.
    pub entry: bool,
    /// Registers per thread (entries only).
    pub registers: u32,
    /// Stack frame bytes per thread (local arrays and spills).
    pub stack_frame: u32,
    /// Bytes of spill stores.
    pub spill_stores: u32,
    /// Bytes of spill loads.
    pub spill_loads: u32,
    /// Static shared memory bytes (entries only).
    pub smem: u32,
}

/// Parses ptxas's verbose report (`--ptxas-options=-v`) into one entry per
/// function, in the order reported: every kernel, and every device function
/// whose properties ptxas lists (a libdevice slow path, say).
pub fn parse_ptxas_log(log: &str) -> Vec<KernelReport> {
    let mut out: Vec<KernelReport> = Vec::new();
    // Index of the report the next "stack frame" / "Used" line belongs to.
    let mut props: Option<usize> = None;
    let mut entry: Option<usize> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default();
            out.push(KernelReport {
                name: name.to_owned(),
                entry: true,
                ..KernelReport::default()
            });
            entry = Some(out.len() - 1);
            props = entry;
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            let name = rest.trim();
            props = match entry {
                Some(e) if out[e].name == name => Some(e),
                _ => {
                    out.push(KernelReport {
                        name: name.to_owned(),
                        ..KernelReport::default()
                    });
                    Some(out.len() - 1)
                }
            };
        } else if line.contains("bytes stack frame")
            && let Some(cur) = props.map(|i| &mut out[i])
        {
            cur.stack_frame = number_before(line, "bytes stack frame").unwrap_or(u32::MAX);
            cur.spill_stores = number_before(line, "bytes spill stores").unwrap_or(u32::MAX);
            cur.spill_loads = number_before(line, "bytes spill loads").unwrap_or(u32::MAX);
        } else if line.contains("Used ")
            && line.contains(" registers")
            && let Some(cur) = entry.map(|i| &mut out[i])
        {
            cur.registers = number_before(line, "registers").unwrap_or(u32::MAX);
            cur.smem = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

/// The integer just before `marker` in `line` (`"..., 12 bytes spill stores"` → 12).
fn number_before(line: &str, marker: &str) -> Option<u32> {
    let head = &line[..line.find(marker)?];
    head.split(|c: char| !c.is_ascii_digit())
        .rfind(|w| !w.is_empty())?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'big' for 'sm_90'
ptxas info    : Function properties for big
ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 30 registers, used 1 barriers, 1088 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 16.488 ms
ptxas info    : Function properties for __internal_trig_reduction_slowpathd
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 12 bytes spill loads
ptxas info    : Compiling entry function 'k' for 'sm_90'
ptxas info    : Function properties for k
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 26 registers, used 0 barriers
";

    #[test]
    fn parses_each_function_of_a_ptxas_report() {
        let r = parse_ptxas_log(LOG);
        assert_eq!(
            r,
            vec![
                KernelReport {
                    name: "big".into(),
                    entry: true,
                    registers: 30,
                    stack_frame: 16,
                    spill_stores: 8,
                    spill_loads: 4,
                    smem: 1088,
                },
                KernelReport {
                    name: "__internal_trig_reduction_slowpathd".into(),
                    spill_loads: 12,
                    ..KernelReport::default()
                },
                KernelReport {
                    name: "k".into(),
                    entry: true,
                    registers: 26,
                    ..KernelReport::default()
                },
            ]
        );
    }

    #[test]
    fn every_source_is_embedded_and_names_its_kernels() {
        for (name, src) in SOURCES {
            assert!(src.contains("__global__"), "{name} has no kernel");
            assert!(
                !src.contains("#include"),
                "{name} includes a header; NVRTC has none"
            );
        }
        assert!(!COMMON.contains("#include"));
    }
}
