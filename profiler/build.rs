//! Puts the kernel programs' object into `OUT_DIR`, where `src/probes` embeds it from.
//!
//! By default it is the committed `redis-stallprof.bpf.o` (built by `cargo xtask build-ebpf`
//! from `profiler-ebpf`), so a stable toolchain alone builds the profiler. With the
//! `build-ebpf` feature the programs are compiled from source by aya-build instead (nightly
//! with `rust-src`, and bpf-linker).
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../profiler-common/src");
    #[cfg(feature = "build-ebpf")]
    {
        aya_build::build_ebpf(
            [aya_build::Package {
                name: "profiler-ebpf",
                root_dir: "../profiler-ebpf",
                ..Default::default()
            }],
            aya_build::Toolchain::default(),
        )
    }
    #[cfg(not(feature = "build-ebpf"))]
    {
        use anyhow::Context as _;
        let committed = std::path::Path::new("redis-stallprof.bpf.o");
        println!("cargo:rerun-if-changed={}", committed.display());
        let out_dir = std::env::var_os("OUT_DIR").context("OUT_DIR not set")?;
        let embedded = std::path::Path::new(&out_dir).join("profiler-ebpf");
        std::fs::copy(committed, &embedded).with_context(|| {
            format!(
                "cannot copy the kernel programs' object {} to {}",
                committed.display(),
                embedded.display()
            )
        })?;
        Ok(())
    }
}
