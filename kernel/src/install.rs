//! `parallax install`: writes the kernelspec (kernel.json and logos) where Jupyter looks.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

const KERNEL_JSON: &str = include_str!("../../install/kernel.json");
const LOGO_32: &[u8] = include_bytes!("../../install/logo-32x32.png");
const LOGO_64: &[u8] = include_bytes!("../../install/logo-64x64.png");
const LOGO_SVG: &[u8] = include_bytes!("../../install/logo-svg.svg");
pub const KERNEL_NAME: &str = "parallax";

#[derive(clap::Args)]
#[group(multiple = false)]
pub struct InstallArgs {
    /// Install for the current user (the default).
    #[arg(long)]
    user: bool,
    /// Install into the active Python environment (a venv or conda env).
    #[arg(long)]
    sys_prefix: bool,
    /// Install under PREFIX/share/jupyter/kernels.
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<PathBuf>,
}

pub fn install(args: &InstallArgs) -> anyhow::Result<()> {
    let data_dir = if let Some(prefix) = &args.prefix {
        prefix.join("share").join("jupyter")
    } else if args.sys_prefix {
        sys_prefix()?.join("share").join("jupyter")
    } else {
        user_data_dir()?
    };
    let dir = data_dir.join("kernels").join(KERNEL_NAME);
    let exe = std::env::current_exe().context("finding the parallax binary")?;
    write_kernelspec(&dir, &exe)?;
    println!(
        "Installed the {KERNEL_NAME} kernelspec in {}",
        dir.display()
    );
    Ok(())
}

pub fn write_kernelspec(dir: &Path, exe: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let exe = exe.to_str().context("the binary's path is not UTF-8")?;
    // JSON-escape the path, then put it in place of the quoted placeholder.
    let quoted = serde_json::to_string(exe)?;
    let spec = KERNEL_JSON.replace("\"{parallax}\"", &quoted);
    serde_json::from_str::<serde_json::Value>(&spec).context("the kernelspec template")?;
    std::fs::write(dir.join("kernel.json"), spec)?;
    std::fs::write(dir.join("logo-32x32.png"), LOGO_32)?;
    std::fs::write(dir.join("logo-64x64.png"), LOGO_64)?;
    std::fs::write(dir.join("logo-svg.svg"), LOGO_SVG)?;
    Ok(())
}

/// Jupyter's per-user data directory, as `jupyter --data-dir` reports it.
fn user_data_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("JUPYTER_DATA_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let home = PathBuf::from(home);
    if cfg!(target_os = "macos") {
        return Ok(home.join("Library").join("Jupyter"));
    }
    Ok(match std::env::var_os("XDG_DATA_HOME") {
        Some(xdg) => PathBuf::from(xdg).join("jupyter"),
        None => home.join(".local").join("share").join("jupyter"),
    })
}

/// The active Python environment's prefix: a venv, a conda env, or python3's own.
fn sys_prefix() -> anyhow::Result<PathBuf> {
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(dir) = std::env::var_os(var) {
            return Ok(PathBuf::from(dir));
        }
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.prefix)"])
        .output()
        .context("running python3 to find sys.prefix")?;
    if !out.status.success() {
        bail!("python3 could not report sys.prefix");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernelspec_has_the_binary_and_message_interrupts() {
        let dir = std::env::temp_dir().join(format!("parallax-spec-{}", std::process::id()));
        write_kernelspec(&dir, Path::new("/opt/with \"quote\"/parallax")).unwrap();
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("kernel.json")).unwrap())
                .unwrap();
        assert_eq!(spec["argv"][0], "/opt/with \"quote\"/parallax");
        assert_eq!(spec["argv"][3], "{connection_file}");
        assert_eq!(spec["display_name"], "Rust (Parallax)");
        assert_eq!(spec["language"], "rust");
        assert_eq!(spec["interrupt_mode"], "message");
        assert!(dir.join("logo-64x64.png").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
