//! `manifest.json`: what a guest image was built from, with the checksums that
//! `kata-ctl check` verifies and the inputs digest that makes a re-run with the
//! same inputs a no-op.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bumped when the image layout changes, so older images are rebuilt.
pub const FORMAT: u32 = 1;

/// File name of the manifest in the image directory.
pub const FILE: &str = "manifest.json";

/// Why a manifest could not be read or written, or does not match.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// I/O trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a manifest of ours.
    #[error("{path}: not a valid kata-rs guest manifest: {message}; rebuild with `kata-ctl image build`")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// SHA-256 checksums, lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checksums {
    /// The kernel image.
    pub vmlinuz: String,
    /// The initramfs.
    pub initrd: String,
    /// The agent binary (the initramfs's `/init`).
    pub agent: String,
    /// The busybox binary.
    pub busybox: String,
}

/// An extra binary put under `/usr/bin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extra {
    /// Path in the guest.
    pub path: String,
    /// SHA-256 of the file.
    pub sha256: String,
}

/// The manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`] of the builder.
    pub format: u32,
    /// Debian kernel package.
    pub kernel_package: String,
    /// Its version.
    pub kernel_package_version: String,
    /// Kernel release.
    pub kver: String,
    /// kata-rs version of the agent.
    pub agent_version: String,
    /// Modules in load order, relative to `/lib/modules/<kver>/`.
    pub modules: Vec<String>,
    /// Wanted modules the kernel has built in.
    pub builtin_modules: Vec<String>,
    /// Optional modules the kernel does not have.
    pub absent_modules: Vec<String>,
    /// Extra binaries.
    pub extras: Vec<Extra>,
    /// Checksums.
    pub sha256: Checksums,
    /// Size of the initramfs in bytes.
    pub initrd_size: u64,
    /// Digest of every input of the build (see `Inputs`).
    pub inputs_digest: String,
    /// SHA-256 of the agent policy at /etc/kata-opa/default-policy.rego,
    /// if the image carries one (`--policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

impl Manifest {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ManifestError::Invalid {
            path: path.into(),
            message,
        })
    }

    /// Parses manifest text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let m: Manifest = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if m.format != FORMAT {
            return Err(format!(
                "format {} (this kata-ctl writes {FORMAT})",
                m.format
            ));
        }
        Ok(m)
    }

    /// Pretty JSON with a final newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// Everything a build's output depends on; its digest is stored in the manifest.
#[derive(Debug, Clone, Serialize)]
pub struct Inputs<'a> {
    /// [`FORMAT`].
    pub format: u32,
    /// kata-ctl version.
    pub builder: &'a str,
    /// Kernel package.
    pub kernel_package: &'a str,
    /// Its version.
    pub kernel_package_version: &'a str,
    /// Agent checksum.
    pub agent: &'a str,
    /// Busybox checksum.
    pub busybox: &'a str,
    /// Extras (guest path, checksum).
    pub extras: &'a [Extra],
    /// Required modules.
    pub required_modules: &'a [&'a str],
    /// Optional modules.
    pub optional_modules: &'a [&'a str],
    /// The default agent policy's checksum (absent: no policy file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<&'a str>,
}

impl Inputs<'_> {
    /// SHA-256 of the canonical JSON form.
    pub fn digest(&self) -> String {
        hex(&Sha256::digest(
            serde_json::to_vec(self).unwrap_or_default(),
        ))
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, ManifestError> {
    let io = |source| ManifestError::Io {
        path: path.into(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format: FORMAT,
            kernel_package: "linux-image-6.1.0-48-cloud-amd64".into(),
            kernel_package_version: "6.1.172-1".into(),
            kver: "6.1.0-48-cloud-amd64".into(),
            agent_version: "0.1.0".into(),
            modules: vec!["kernel/drivers/virtio/virtio.ko".into()],
            builtin_modules: vec![],
            absent_modules: vec!["virtio_rng".into()],
            extras: vec![Extra {
                path: "/usr/bin/peer".into(),
                sha256: "00".into(),
            }],
            sha256: Checksums {
                vmlinuz: "a".into(),
                initrd: "b".into(),
                agent: "c".into(),
                busybox: "d".into(),
            },
            initrd_size: 42,
            inputs_digest: "e".into(),
            policy: None,
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let back = Manifest::parse(&m.to_json()).unwrap();
        assert_eq!(back, m);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(FILE);
        std::fs::write(&p, m.to_json()).unwrap();
        assert_eq!(Manifest::load(&p).unwrap(), m);
    }

    #[test]
    fn rejects_other_formats_and_garbage() {
        let mut m = sample();
        m.format = FORMAT + 1;
        assert!(Manifest::parse(&m.to_json())
            .unwrap_err()
            .contains("format"));
        assert!(Manifest::parse("{}").is_err());
        let e = Manifest::load(Path::new("/nonexistent/manifest.json")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/manifest.json"));
    }

    #[test]
    fn digests() {
        let extras = [];
        let i = Inputs {
            format: FORMAT,
            builder: "0.1.0",
            kernel_package: "k",
            kernel_package_version: "1",
            agent: "a",
            busybox: "b",
            extras: &extras,
            required_modules: &["virtio"],
            optional_modules: &[],
            policy: None,
        };
        let j = Inputs {
            agent: "a2",
            ..i.clone()
        };
        assert_eq!(i.digest(), i.clone().digest());
        assert_ne!(i.digest(), j.digest());
        assert_eq!(i.digest().len(), 64);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
