//! `kata-ctl check` and `kata-ctl image build` as a user runs them.

use std::process::Command;

use kata_tests::{bin, guest_dir};

fn config(dir: &std::path::Path, kernel: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("configuration.toml");
    let g = guest_dir();
    std::fs::write(
        &p,
        format!(
            "[hypervisor.qemu]\nkernel = \"{}\"\ninitrd = \"{}\"\naccelerator = \"tcg\"\n",
            kernel.display(),
            g.join("initrd.img").display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn check_passes_with_the_test_image_and_fails_without_a_kernel() {
    let tmp = tempfile::tempdir().unwrap();
    let good = config(tmp.path(), &guest_dir().join("vmlinuz"));
    let out = Command::new(bin("kata-ctl"))
        .args(["check", "--verbose", "--no-network-checks", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok") && l.contains("qemu")),
        "{text}"
    );
    assert!(text.contains("vsock"), "{text}");

    let sub = tmp.path().join("bad");
    std::fs::create_dir(&sub).unwrap();
    let bad = config(&sub, &tmp.path().join("no-such-vmlinuz"));
    let out = Command::new(bin("kata-ctl"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "check must fail without a kernel:\n{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("FAIL")), "{text}");
}

#[test]
fn image_build_is_reproducible_and_fast_when_up_to_date() {
    kata_tests::require_root();
    let tmp = tempfile::tempdir().unwrap();
    let build = |out: &std::path::Path| {
        let o = Command::new(bin("kata-ctl"))
            .args(["image", "build", "--output"])
            .arg(out)
            .arg("--agent")
            .arg(bin("kata-agent"))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "image build: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    build(&a);
    build(&b);
    assert_eq!(
        std::fs::read(a.join("initrd.img")).unwrap(),
        std::fs::read(b.join("initrd.img")).unwrap()
    );
    let again = build(&a);
    assert!(again.contains("up to date"), "{again}");
}

#[test]
fn env_prints_the_effective_configuration_and_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[hypervisor.qemu]\ndefault_memory = 333\n").unwrap();
    let out = Command::new(bin("kata-ctl"))
        .args(["env", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: toml::Value = toml::from_str(&text).expect("env prints TOML");
    assert_eq!(v["meta"]["source"].as_str(), Some(cfg.to_str().unwrap()));
    assert_eq!(
        v["configuration"]["hypervisor"]["qemu"]["default_memory"].as_integer(),
        Some(333)
    );
    // a bad file: an error naming it, nothing on stdout
    std::fs::write(&cfg, "[hypervisor.qemu]\ndefault_memory = \"x\"\n").unwrap();
    let out = Command::new(bin("kata-ctl"))
        .args(["env", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("default_memory") && err.contains("c.toml"),
        "{err}"
    );
}

/// No kernel source on the machine (an empty `KATA_KERNEL_SOURCE_DIR`
/// stands in for a missing linux-source package): building kata-rs's kernel
/// fails saying what to install, and the image build `make image` runs
/// (`--kernel auto`) falls back to Debian's cloud kernel, saying so.
#[test]
fn without_kernel_source_the_build_says_so_and_images_fall_back_to_debian() {
    kata_tests::require_root();
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("src");
    std::fs::create_dir(&empty).unwrap();
    let o = Command::new(bin("kata-ctl"))
        .args(["image", "kernel", "--cache-dir"])
        .arg(tmp.path().join("cache"))
        .env("KATA_KERNEL_SOURCE_DIR", &empty)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{o:?}");
    assert!(
        err.contains("no kernel source") && err.contains("apt-get install linux-source"),
        "{err}"
    );
    let out = tmp.path().join("image");
    let o = Command::new(bin("kata-ctl"))
        .args(["image", "build", "--kernel", "auto", "--agent"])
        .arg(bin("kata-agent"))
        .arg("--output")
        .arg(&out)
        .env("KATA_KERNEL_SOURCE_DIR", &empty)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{o:?}");
    assert!(
        err.contains("the image gets Debian's cloud kernel"),
        "{err}"
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert!(
        m["kernel_package"]
            .as_str()
            .unwrap_or_default()
            .starts_with("linux-image-"),
        "{m}"
    );
}

/// The test images carry the kernel `make` chose (`KERNEL`, exported as
/// `KATA_TEST_KERNEL`): kata-rs's own kernel, with every driver a pod needs
/// built in (no module in the image) and every option of the configuration
/// fragments in effect, or Debian's cloud kernel package.
#[test]
fn the_images_have_the_chosen_kernel() {
    let want = std::env::var("KATA_TEST_KERNEL").expect(
        "KATA_TEST_KERNEL (kata-rs or debian) names the kernel the test images were built with; \
         `make test` sets it",
    );
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(guest_dir().join("manifest.json")).expect("the test image's manifest"),
    )
    .unwrap();
    let package = m["kernel_package"].as_str().unwrap_or_default();
    match want.as_str() {
        "kata-rs" => {
            assert_eq!(
                package, "kata-rs-kernel",
                "KERNEL=kata-rs but the test image has {package}: the kernel build failed \
                 (see make's output) and the image fell back to Debian's"
            );
            assert!(
                m["kver"].as_str().unwrap_or_default().ends_with("-kata-rs"),
                "{}",
                m["kver"]
            );
            assert_eq!(
                m["modules"],
                serde_json::json!([]),
                "no module: all built in"
            );
            let kernel = std::fs::read(guest_dir().join("vmlinuz")).unwrap();
            assert_eq!(
                &kernel[..4],
                b"\x7fELF",
                "the kernel QEMU boots is the ELF it enters through PVH"
            );
            let builtin: Vec<&str> = m["builtin_modules"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
            for needed in [
                "virtio_pci",
                "vmw_vsock_virtio_transport",
                "virtiofs",
                "virtio_net",
                "overlay",
            ] {
                assert!(
                    builtin.contains(&needed),
                    "{needed} not built in: {builtin:?}"
                );
            }
            let o = Command::new(bin("kata-ctl"))
                .args(["image", "kernel", "--check"])
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "the built kernel's configuration: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            // the patched kernel takes the APIC timer's period from the
            // launcher's lapic_timer_hz instead of measuring it
            let tmp = tempfile::tempdir().unwrap();
            let cfg = kata_tests::shim::write_config(&tmp.path().join("c.toml"), "", "");
            let console = tmp.path().join("console.log");
            let o = Command::new(bin("kata-ctl"))
                .arg("boot")
                .arg("--config")
                .arg(&cfg)
                .arg("--guest-dir")
                .arg(guest_dir())
                .arg("--console-log")
                .arg(&console)
                .args(["--kernel-params", "apic=verbose loglevel=7"])
                .output()
                .unwrap();
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            assert!(o.status.success(), "kata-ctl boot: {o:?}\n{text}");
            assert!(
                text.contains("lapic timer already calibrated 4000000"),
                "1 GHz at HZ=250: {text}"
            );
            assert!(!text.contains("calibrating APIC timer"), "{text}");
        }
        "debian" => assert!(package.starts_with("linux-image-"), "{package}"),
        other => panic!("KATA_TEST_KERNEL={other}: kata-rs or debian"),
    }
}
