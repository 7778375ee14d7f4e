//! Builds the guest runtime and every program in programs/ into static ELF images with the
//! host's own rustc: no_std, panic=abort, our linker script. The images are embedded in
//! this crate (see src/lib.rs) so that godwit can boot them with no files around.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn rustc(args: &[&str]) {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .args(args)
        // The host build's flags (e.g. crt-static for a static godwit) are not ours.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {rustc}: {e}"));
    if !out.status.success() {
        panic!(
            "guest build failed: {rustc} {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn main() {
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    for d in ["rt", "programs"] {
        println!("cargo:rerun-if-changed={}", dir.join(d).display());
    }
    for f in ["abi.rs", "guest.ld", "../gpu/src/abi.rs"] {
        println!("cargo:rerun-if-changed={}", dir.join(f).display());
    }
    let out_s = out.to_str().unwrap();
    let common = [
        "--edition=2021",
        "--target=x86_64-unknown-linux-gnu",
        "-Cpanic=abort",
        "-Copt-level=2",
        "-Cdebuginfo=0",
        "-Crelocation-model=static",
        "-Ctarget-feature=+crt-static",
        "-Dwarnings",
    ];
    let rlib = out.join("libgodwit_rt.rlib");
    let mut args: Vec<&str> = common.to_vec();
    let rt = dir.join("rt/lib.rs");
    args.extend([
        "--crate-type=rlib",
        "--crate-name=godwit_rt",
        rt.to_str().unwrap(),
        "-o",
        rlib.to_str().unwrap(),
    ]);
    rustc(&args);

    let ld = format!("-Clink-arg=-Wl,-T,{}", dir.join("guest.ld").display());
    let extern_rt = format!("godwit_rt={}", rlib.display());
    let mut images = Vec::new();
    let mut programs: Vec<PathBuf> = fs::read_dir(dir.join("programs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    programs.sort();
    for src in &programs {
        let stem = src.file_stem().unwrap().to_str().unwrap();
        let name = stem.replace('_', "-");
        let elf = out.join(format!("{name}.elf"));
        let mut args: Vec<&str> = common.to_vec();
        args.extend([
            "--crate-type=bin",
            "--crate-name",
            stem,
            src.to_str().unwrap(),
            "--extern",
            &extern_rt,
            "-L",
            out_s,
            "-Clink-arg=-nostartfiles",
            "-Clink-arg=-nostdlib",
            "-Clink-arg=-static",
            "-Clink-arg=-no-pie",
            "-Clink-arg=-Wl,--build-id=none",
            "-Clink-arg=-Wl,-z,noexecstack",
            &ld,
            "-o",
            elf.to_str().unwrap(),
        ]);
        rustc(&args);
        images.push((name, elf));
    }
    let mut table = String::from("/// Every guest image built from programs/, by name.\npub const IMAGES: &[(&str, &[u8])] = &[\n");
    for (name, elf) in &images {
        table += &format!("    ({name:?}, include_bytes!({:?})),\n", path_str(elf));
    }
    table += "];\n";
    fs::write(out.join("images.rs"), table).unwrap();
}

fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}
