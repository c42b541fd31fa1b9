//! Builds the eBPF programs (`profiler-ebpf`) for the BPF target with aya-build; `src/probes.rs`
//! embeds the object from `OUT_DIR`.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../profiler-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "profiler-ebpf",
            root_dir: "../profiler-ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
