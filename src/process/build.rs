//! Compiles the seccomp policies in `policies/*.json` (seccompiler's JSON format) into BPF at
//! build time, so the binaries carry exactly the audited policy and parse no JSON at run time.

use std::fmt::Write as _;
use std::fs::File;
use std::path::PathBuf;

fn main() {
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => seccompiler::TargetArch::x86_64,
        Ok("aarch64") => seccompiler::TargetArch::aarch64,
        Ok("riscv64") => seccompiler::TargetArch::riscv64,
        other => panic!("no seccomp policy for target arch {other:?}"),
    };
    let mut out = String::from(
        "/// One BPF instruction: (code, jt, jf, k).\npub type Instruction = (u16, u8, u8, u32);\n/// A named filter.\npub type NamedFilter = (&'static str, &'static [Instruction]);\n",
    );
    for (name, file) in [
        ("WORKER", "../../policies/worker.json"),
        ("BROKER", "../../policies/broker.json"),
    ] {
        println!("cargo:rerun-if-changed={file}");
        let json = File::open(file).unwrap_or_else(|e| panic!("{file}: {e}"));
        let map =
            seccompiler::compile_from_json(json, arch).unwrap_or_else(|e| panic!("{file}: {e}"));
        let mut names: Vec<&String> = map.keys().collect();
        names.sort();
        writeln!(out, "/// Filters compiled from `{file}`, in name order.").unwrap();
        writeln!(out, "pub const {name}: &[NamedFilter] = &[").unwrap();
        for filter in names {
            write!(out, "    ({filter:?}, &[").unwrap();
            for ins in &map[filter] {
                write!(out, "({}, {}, {}, {}), ", ins.code, ins.jt, ins.jf, ins.k).unwrap();
            }
            writeln!(out, "]),").unwrap();
        }
        writeln!(out, "];").unwrap();
    }
    let dest = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("seccomp_filters.rs");
    std::fs::write(dest, out).unwrap();
}
