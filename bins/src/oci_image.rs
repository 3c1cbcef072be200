//! `kata-ctl oci-image`: a busybox container image built locally, as an OCI
//! image layout tar that `ctr image import` takes (no registry needed).
//!
//! The tar holds `oci-layout`, `index.json` (one manifest, annotated with
//! `org.opencontainers.image.ref.name` = the full image name, which `ctr image
//! import` uses as the image's name) and `blobs/sha256/<digest>` for the
//! manifest, the config and one uncompressed layer. The layer is a minimal
//! root file system: a static busybox with a link under `/bin` for every applet
//! it has, `/etc/passwd` and `/etc/group` (root, nobody), `/tmp` (1777) and the
//! usual mount points. Every entry has a fixed owner and mtime and the entries
//! are sorted, so the same busybox always gives the same digests.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::image::elf;

/// The default image name.
pub const DEFAULT_NAME: &str = "docker.io/library/busybox:latest";

/// The mtime of every entry (2024-01-01T00:00:00Z).
const EPOCH: u64 = 1_704_067_200;
/// The same instant for the config's `created`.
const CREATED: &str = "2024-01-01T00:00:00Z";

/// The image's `PATH`.
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\n";

/// Why the image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OciImageError {
    /// The busybox is missing or unusable.
    #[error("busybox {path}: {message}")]
    Busybox {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// The image's command names nothing the image has.
    #[error("--cmd: {0}")]
    Cmd(String),
    /// Writing the output.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

const BUSYBOX_HINT: &str =
    "install Debian's busybox-static (`apt-get install busybox-static`) or pass --busybox";

/// What `kata-ctl oci-image` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The tar to write.
    pub output: PathBuf,
    /// The image name (`ctr image import` names the image so).
    pub name: String,
    /// A static busybox.
    pub busybox: PathBuf,
    /// The image's default command (`Cmd`): `["sh"]` for a workload image,
    /// `["sleep", "inf"]` for a pod's sandbox (pause) image.
    pub cmd: Vec<String>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Report {
    /// `sha256:...` of the manifest (what `ctr image ls` shows as the digest).
    pub manifest_digest: String,
    /// How many applet links the layer has.
    pub applets: usize,
    /// Size of the tar in bytes.
    pub size: u64,
}

/// One content-addressed blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// `sha256:<hex>`
    pub digest: String,
    /// The content.
    pub data: Vec<u8>,
}

impl Blob {
    fn new(data: Vec<u8>) -> Self {
        Blob {
            digest: digest(&data),
            data,
        }
    }

    fn descriptor(&self, media_type: &str) -> serde_json::Value {
        json!({ "mediaType": media_type, "digest": self.digest, "size": self.data.len() })
    }
}

/// The image in memory: what goes into the layout.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `index.json`
    pub index: Vec<u8>,
    /// The manifest blob.
    pub manifest: Blob,
    /// The config blob.
    pub config: Blob,
    /// The layer blob (an uncompressed tar).
    pub layer: Blob,
}

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    format!(
        "sha256:{}",
        crate::image::manifest::hex(&Sha256::digest(data))
    )
}

/// Builds the image and writes the tar.
pub fn build(opts: &Options) -> Result<Report, OciImageError> {
    let bb_err = |message: String| OciImageError::Busybox {
        path: opts.busybox.clone(),
        message,
    };
    eprintln!("[1/3] reading busybox {}", opts.busybox.display());
    let busybox =
        std::fs::read(&opts.busybox).map_err(|e| bb_err(format!("{e}; {BUSYBOX_HINT}")))?;
    let info =
        elf::inspect_executable(&busybox).map_err(|e| bb_err(format!("{e}; {BUSYBOX_HINT}")))?;
    if !info.is_static || !info.is_x86_64 {
        return Err(bb_err(format!(
            "not a static x86-64 executable (interpreter {:?}): the image has no libraries; {BUSYBOX_HINT}",
            info.interpreter
        )));
    }
    let applets = list_applets(&opts.busybox).map_err(bb_err)?;
    check_cmd(&opts.cmd, &applets)?;
    eprintln!(
        "[2/3] building the layer: busybox with {} applet links",
        applets.len()
    );
    let layout =
        layout(&opts.name, &busybox, &applets, &opts.cmd).map_err(|source| OciImageError::Io {
            path: opts.output.clone(),
            source,
        })?;
    eprintln!(
        "[3/3] writing {} ({} as {})",
        opts.output.display(),
        opts.name,
        layout.manifest.digest
    );
    let io = |source| OciImageError::Io {
        path: opts.output.clone(),
        source,
    };
    if let Some(dir) = opts.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // written next to the output and renamed: a reader never sees half a tar
    let tmp = opts.output.with_extension("tar.partial");
    let bytes = layout_tar(&layout).map_err(io)?;
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &opts.output).map_err(io)?;
    Ok(Report {
        manifest_digest: layout.manifest.digest,
        applets: applets.len(),
        size: bytes.len() as u64,
    })
}

/// The applets `busybox --list` names, sorted, without `busybox` itself.
fn list_applets(busybox: &Path) -> Result<Vec<String>, String> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| format!("cannot run `{} --list`: {e}", busybox.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} --list` failed ({}): {}",
            busybox.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let applets = parse_applets(&String::from_utf8_lossy(&out.stdout));
    if !applets.iter().any(|a| a == "sh") {
        return Err("this busybox has no `sh` applet".into());
    }
    Ok(applets)
}

/// The command must name something the image has: an absolute path, or
/// one of the applets (the image's PATH holds only `/bin`).
fn check_cmd(cmd: &[String], applets: &[String]) -> Result<(), OciImageError> {
    let Some(first) = cmd.first() else {
        return Err(OciImageError::Cmd(
            "the command is empty: give at least one --cmd".into(),
        ));
    };
    if first.starts_with('/') || applets.iter().any(|a| a == first) {
        return Ok(());
    }
    Err(OciImageError::Cmd(format!(
        "{first:?} is neither an absolute path nor a busybox applet of this busybox"
    )))
}

/// Applet names from `busybox --list` output: sorted, deduplicated, only
/// plain names.
fn parse_applets(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/') && *a != "." && *a != "..")
        .map(String::from)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// An entry of the layer.
enum Node<'a> {
    Dir(u32),
    File(u32, &'a [u8]),
    Symlink(&'a str),
}

/// The image from a busybox binary and its applet names.
pub fn layout(
    name: &str,
    busybox: &[u8],
    applets: &[String],
    cmd: &[String],
) -> std::io::Result<Layout> {
    let layer = Blob::new(layer_tar(busybox, applets)?);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": {
            "Env": [PATH_ENV],
            "Cmd": cmd,
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
        "history": [{ "created": CREATED, "created_by": "kata-ctl oci-image" }],
    });
    let config = Blob::new(to_json(&config));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.descriptor(MEDIA_CONFIG),
        "layers": [layer.descriptor(MEDIA_LAYER)],
    });
    let manifest = Blob::new(to_json(&manifest));
    let mut desc = manifest.descriptor(MEDIA_MANIFEST);
    desc["annotations"] = json!({ REF_NAME: name });
    desc["platform"] = json!({ "architecture": "amd64", "os": "linux" });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [desc],
    });
    Ok(Layout {
        index: to_json(&index),
        manifest,
        config,
        layer,
    })
}

/// Compact JSON; serde_json's maps are sorted, so the bytes are stable.
fn to_json(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// The layer: a tar of the root file system, entries sorted by path.
fn layer_tar(busybox: &[u8], applets: &[String]) -> std::io::Result<Vec<u8>> {
    let mut nodes: BTreeMap<String, Node<'_>> = BTreeMap::new();
    for d in [
        "bin", "dev", "etc", "home", "proc", "sys", "usr", "usr/bin", "usr/sbin", "var",
    ] {
        nodes.insert(d.into(), Node::Dir(0o755));
    }
    nodes.insert("root".into(), Node::Dir(0o700));
    nodes.insert("tmp".into(), Node::Dir(0o1777));
    nodes.insert("var/tmp".into(), Node::Dir(0o1777));
    nodes.insert("bin/busybox".into(), Node::File(0o755, busybox));
    nodes.insert("etc/passwd".into(), Node::File(0o644, PASSWD.as_bytes()));
    nodes.insert("etc/group".into(), Node::File(0o644, GROUP.as_bytes()));
    for a in applets {
        nodes
            .entry(format!("bin/{a}"))
            .or_insert(Node::Symlink("busybox"));
    }
    let mut b = tar::Builder::new(Vec::new());
    for (path, node) in &nodes {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(EPOCH);
        match node {
            Node::Dir(mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Node::File(mode, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, *data)?;
            }
            Node::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, path, target)?;
            }
        }
    }
    b.into_inner()
}

/// The OCI image layout as a tar: `oci-layout`, `index.json`, the blobs.
pub fn layout_tar(l: &Layout) -> std::io::Result<Vec<u8>> {
    let mut files: BTreeMap<String, &[u8]> = BTreeMap::new();
    let oci_layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    files.insert("oci-layout".into(), oci_layout);
    files.insert("index.json".into(), &l.index);
    for blob in [&l.manifest, &l.config, &l.layer] {
        let hex = blob.digest.trim_start_matches("sha256:");
        files.insert(format!("blobs/sha256/{hex}"), &blob.data);
    }
    let mut b = tar::Builder::new(Vec::new());
    for d in ["blobs/", "blobs/sha256/"] {
        let mut h = dir_header();
        b.append_data(&mut h, d, std::io::empty())?;
    }
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(EPOCH);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data)?;
    }
    b.into_inner()
}

fn dir_header() -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(EPOCH);
    h.set_size(0);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn applets() -> Vec<String> {
        parse_applets("sh\necho\nbusybox\nls\n\nsh\n")
    }

    fn sh() -> Vec<String> {
        vec!["sh".into()]
    }

    #[test]
    fn the_command_is_checked_and_lands_in_the_config() {
        let cmd = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_cmd(&cmd(&["ls", "-l"]), &applets()).is_ok());
        assert!(check_cmd(&cmd(&["/pause"]), &applets()).is_ok());
        let e = check_cmd(&[], &applets()).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let e = check_cmd(&cmd(&["pause"]), &applets())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"pause\"") && e.contains("applet"), "{e}");
        let l = layout(DEFAULT_NAME, b"bb", &applets(), &cmd(&["sleep", "inf"])).unwrap();
        let config: serde_json::Value = serde_json::from_slice(&l.config.data).unwrap();
        assert_eq!(config["config"]["Cmd"], json!(["sleep", "inf"]));
    }

    /// (path, entry type, mode, link target, data) of every entry.
    type Entries = Vec<(String, tar::EntryType, u32, Option<String>, Vec<u8>)>;

    fn entries(tar_bytes: &[u8]) -> Entries {
        let mut a = tar::Archive::new(tar_bytes);
        let mut v = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            let h = e.header().clone();
            let link = e.link_name().unwrap().map(|l| l.display().to_string());
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            assert_eq!(h.mtime().unwrap(), EPOCH, "{path}");
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0), "{path}");
            v.push((path, h.entry_type(), h.mode().unwrap(), link, data));
        }
        v
    }

    #[test]
    fn applet_list_is_clean() {
        assert_eq!(applets(), ["echo", "ls", "sh"]);
    }

    #[test]
    fn layout_digests_and_references_match() {
        let l = layout(DEFAULT_NAME, b"\x7fELF fake busybox", &applets(), &sh()).unwrap();
        let tar_bytes = layout_tar(&l).unwrap();
        let files: BTreeMap<String, Vec<u8>> = entries(&tar_bytes)
            .into_iter()
            .filter(|e| e.1 == tar::EntryType::Regular)
            .map(|e| (e.0, e.4))
            .collect();
        assert_eq!(
            files["oci-layout"],
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()
        );
        // every blob is named by the digest of its content
        let mut blobs = 0;
        for (path, data) in &files {
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(digest(data), format!("sha256:{hex}"), "{path}");
                blobs += 1;
            }
        }
        assert_eq!(blobs, 3);
        let blob = |d: &serde_json::Value| {
            let d = d.as_str().unwrap();
            files[&format!("blobs/sha256/{}", d.trim_start_matches("sha256:"))].clone()
        };

        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        assert_eq!(index["schemaVersion"], 2);
        let m = &index["manifests"][0];
        assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(m["annotations"][REF_NAME], DEFAULT_NAME);
        assert_eq!(m["mediaType"], MEDIA_MANIFEST);
        let manifest_bytes = blob(&m["digest"]);
        assert_eq!(m["size"], manifest_bytes.len());

        let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
        assert_eq!(manifest["config"]["mediaType"], MEDIA_CONFIG);
        let config_bytes = blob(&manifest["config"]["digest"]);
        assert_eq!(manifest["config"]["size"], config_bytes.len());
        let layer_desc = &manifest["layers"][0];
        assert_eq!(layer_desc["mediaType"], MEDIA_LAYER);
        let layer_bytes = blob(&layer_desc["digest"]);
        assert_eq!(layer_desc["size"], layer_bytes.len());

        let config: serde_json::Value = serde_json::from_slice(&config_bytes).unwrap();
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["config"]["Cmd"], json!(["sh"]));
        assert!(config["config"]["Env"][0]
            .as_str()
            .unwrap()
            .starts_with("PATH="));
        // uncompressed layer: its diff id is its digest
        assert_eq!(config["rootfs"]["diff_ids"][0], layer_desc["digest"]);

        let layer = entries(&layer_bytes);
        let find = |p: &str| {
            layer
                .iter()
                .find(|e| e.0 == p)
                .unwrap_or_else(|| panic!("{p}"))
        };
        let bb = find("bin/busybox");
        assert_eq!((bb.1, bb.2), (tar::EntryType::Regular, 0o755));
        assert_eq!(bb.4, b"\x7fELF fake busybox");
        for a in ["bin/sh", "bin/ls", "bin/echo"] {
            let e = find(a);
            assert_eq!(e.1, tar::EntryType::Symlink, "{a}");
            assert_eq!(e.3.as_deref(), Some("busybox"), "{a}");
        }
        let tmp = find("tmp/");
        assert_eq!((tmp.1, tmp.2), (tar::EntryType::Directory, 0o1777));
        for d in ["proc/", "sys/", "dev/", "etc/", "root/"] {
            assert_eq!(find(d).1, tar::EntryType::Directory, "{d}");
        }
        assert!(String::from_utf8_lossy(&find("etc/passwd").4).starts_with("root:x:0:0:"));
        assert!(String::from_utf8_lossy(&find("etc/group").4).contains("nobody:x:65534:"));
        // sorted, parents before children
        let paths: Vec<&str> = layer.iter().map(|e| e.0.trim_end_matches('/')).collect();
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted);
    }

    #[test]
    fn layout_is_reproducible_and_named() {
        let a = layout_tar(&layout(DEFAULT_NAME, b"bb", &applets(), &sh()).unwrap()).unwrap();
        let b = layout_tar(&layout(DEFAULT_NAME, b"bb", &applets(), &sh()).unwrap()).unwrap();
        assert_eq!(a, b);
        let c = layout("example.org/x/busybox:1", b"bb", &applets(), &sh()).unwrap();
        assert!(String::from_utf8_lossy(&c.index).contains("example.org/x/busybox:1"));
        let d = layout(DEFAULT_NAME, b"bb2", &applets(), &sh()).unwrap();
        assert_ne!(
            d.manifest.digest,
            layout(DEFAULT_NAME, b"bb", &applets(), &sh())
                .unwrap()
                .manifest
                .digest
        );
    }

    #[test]
    fn build_rejects_a_dynamic_busybox() {
        let tmp = tempfile::tempdir().unwrap();
        let e = build(&Options {
            output: tmp.path().join("x.tar"),
            name: DEFAULT_NAME.into(),
            busybox: PathBuf::from("/bin/ls"),
            cmd: sh(),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("static"), "{e}");
        let e = build(&Options {
            output: tmp.path().join("x.tar"),
            name: DEFAULT_NAME.into(),
            busybox: tmp.path().join("none"),
            cmd: sh(),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("busybox-static"), "{e}");
    }

    #[test]
    fn build_with_the_host_busybox() {
        let bb = Path::new(crate::image::DEFAULT_BUSYBOX);
        assert!(bb.exists(), "{BUSYBOX_HINT}");
        let tmp = tempfile::tempdir().unwrap();
        let opts = |o: &str| Options {
            output: tmp.path().join(o),
            name: DEFAULT_NAME.into(),
            busybox: bb.into(),
            cmd: sh(),
        };
        let r1 = build(&opts("a/img.tar")).unwrap();
        let r2 = build(&opts("b.tar")).unwrap();
        assert_eq!(r1.manifest_digest, r2.manifest_digest);
        assert!(r1.applets > 100, "{}", r1.applets);
        assert_eq!(
            std::fs::read(tmp.path().join("a/img.tar")).unwrap(),
            std::fs::read(tmp.path().join("b.tar")).unwrap()
        );
        assert!(!tmp.path().join("a/img.tar.partial").exists());
    }
}
