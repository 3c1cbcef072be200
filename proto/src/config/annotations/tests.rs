use super::*;
use crate::config::InterworkingModel;

fn cfg(extra: &str) -> Config {
    let mut c = Config::parse(&format!("[hypervisor.qemu]\n{extra}\n")).unwrap();
    c.source = Some("/etc/kata-containers/configuration.toml".into());
    c
}

fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn apply(c: &mut Config, pairs: &[(&str, &str)]) -> Result<(), ConfigError> {
    c.apply_annotations(&annotations(pairs))
}

const HV: &str = "io.katacontainers.config.hypervisor.";

fn hv(key: &str) -> String {
    format!("{HV}{key}")
}

#[test]
fn config_annotations_hypervisor_need_enable_annotations() {
    let mut c = cfg("");
    let e = apply(&mut c, &[(&hv("default_memory"), "1024")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "annotation io.katacontainers.config.hypervisor.default_memory is not allowed: \
         add \"default_memory\" to enable_annotations in /etc/kata-containers/configuration.toml ([hypervisor.qemu])"
    );
    assert_eq!(c, cfg(""));

    let mut c = cfg("enable_annotations = [\"default_memory\", \"default_.*cpus\"]");
    apply(
        &mut c,
        &[
            (&hv("default_memory"), "1024"),
            (&hv("default_vcpus"), "2"),
            (&hv("default_maxvcpus"), "4"),
        ],
    )
    .unwrap();
    let q = &c.hypervisor.qemu;
    assert_eq!(
        (q.default_memory, q.default_vcpus, q.default_maxvcpus),
        (1024, 2, 4)
    );

    // Full match only: "memory" does not enable "default_memory".
    let mut c = cfg("enable_annotations = [\"memory\", \"default\"]");
    let e = apply(&mut c, &[(&hv("default_memory"), "1024")]).unwrap_err();
    assert!(
        matches!(e, ConfigError::AnnotationNotAllowed { ref key, .. } if key == "default_memory")
    );

    // ".*" enables everything.
    let mut c = cfg("enable_annotations = [\".*\"]");
    apply(
        &mut c,
        &[(&hv("enable_debug"), "true"), (&hv("machine_type"), "pc")],
    )
    .unwrap();
    assert!(c.hypervisor.qemu.enable_debug);
    assert_eq!(c.hypervisor.qemu.machine_type, "pc");
}

#[test]
fn config_annotations_not_allowed_without_a_file() {
    let mut c = Config::default();
    let e = apply(&mut c, &[(&hv("kernel_params"), "quiet")]).unwrap_err();
    assert!(
        e.to_string()
            .contains("none was found: the built-in defaults are in use"),
        "{e}"
    );
}

#[test]
fn config_annotations_agent_and_runtime() {
    let mut c = cfg("");
    apply(
        &mut c,
        &[
            (
                "io.katacontainers.config.agent.kernel_modules",
                "e1000e EEE=1; i915 ;",
            ),
            ("io.katacontainers.config.agent.enable_debug", "true"),
            ("io.katacontainers.config.agent.debug_console_enabled", "1"),
            ("io.katacontainers.config.agent.enable_tracing", "True"),
            ("io.katacontainers.config.agent.dial_timeout", "90"),
            (
                "io.katacontainers.config.runtime.disable_guest_seccomp",
                "true",
            ),
            (
                "io.katacontainers.config.runtime.internetworking_model",
                "macvtap",
            ),
            ("io.katacontainers.config.runtime.enable_pprof", "false"),
            ("io.katacontainers.config.runtime.experimental", ""),
            // Not configuration annotations: ignored.
            ("io.katacontainers.config_path", "/tmp/evil.toml"),
            ("io.katacontainers.pkg.oci.bundle_path", "/b"),
            ("io.kubernetes.cri.sandbox-memory", "1"),
        ],
    )
    .unwrap();
    let a = &c.agent.kata;
    assert_eq!(a.kernel_modules, ["e1000e EEE=1", "i915"]);
    assert!(a.enable_debug && a.debug_console_enabled && a.enable_tracing);
    assert_eq!(a.dial_timeout, 90);
    assert!(c.runtime.disable_guest_seccomp);
    assert_eq!(c.runtime.internetworking_model, InterworkingModel::Macvtap);

    // Host-side runtime keys need enable_annotations.
    for key in ["sandbox_cgroup_only", "disable_new_netns", "enable_debug"] {
        let a = format!("io.katacontainers.config.runtime.{key}");
        let e = apply(&mut cfg(""), &[(&a, "true")]).unwrap_err();
        assert!(
            matches!(e, ConfigError::AnnotationNotAllowed { .. }),
            "{key}: {e}"
        );
    }
    let mut c = cfg("enable_annotations = [\"sandbox_cgroup_only\"]");
    apply(
        &mut c,
        &[(
            "io.katacontainers.config.runtime.sandbox_cgroup_only",
            "true",
        )],
    )
    .unwrap();
    assert!(c.runtime.sandbox_cgroup_only);
}

#[test]
fn config_annotations_unknown_keys_are_errors() {
    for a in [
        "io.katacontainers.config.hypervisor.enable_iommu",
        "io.katacontainers.config.hypervisor",
        "io.katacontainers.config.factory.template",
        "io.katacontainers.config.agent.container_pipe_size",
        "io.katacontainers.config.runtime.vfio_mode",
        "io.katacontainers.config.hypervisor.accelerator",
    ] {
        // Unknown even when everything is enabled.
        let e = apply(&mut cfg("enable_annotations = [\".*\"]"), &[(a, "1")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("annotation {a} is not supported by kata-rs")
        );
    }
}

#[test]
fn config_annotations_bad_values_name_the_annotation() {
    let all = "enable_annotations = [\".*\"]";
    let cases = [
        (hv("default_memory"), "big", "expected an unsigned integer"),
        (hv("default_vcpus"), "-1", "expected a number of vCPUs"),
        (
            hv("enable_debug"),
            "yes",
            "expected a boolean (true or false)",
        ),
        (
            hv("virtio_fs_cache"),
            "metadata",
            "expected one of `auto`, `always`, `never`",
        ),
        (
            hv("shared_fs"),
            "virtio-9p",
            "expected `virtio-fs` or `none`",
        ),
        (
            hv("virtio_fs_extra_args"),
            "--xattr",
            "expected a JSON list of strings",
        ),
        (
            hv("virtio_fs_extra_args"),
            "[\"--sandbox=none\"]",
            "\"--sandbox=none\" is not one",
        ),
        (hv("kernel"), "vmlinuz", "expected an absolute path"),
        (hv("kernel_params"), "a\nb", "without control characters"),
        (
            "io.katacontainers.config.agent.kernel_modules".into(),
            "a/b",
            "expected a ;-separated list",
        ),
        (
            "io.katacontainers.config.agent.policy".into(),
            "not base64!",
            "expected the agent policy (Rego) as base64",
        ),
        (
            "io.katacontainers.config.agent.policy".into(),
            "//79",
            "base64 of UTF-8 text",
        ),
        (
            "io.katacontainers.config.agent.dial_timeout".into(),
            "-5",
            "expected an unsigned integer",
        ),
        (
            "io.katacontainers.config.runtime.internetworking_model".into(),
            "bridged",
            "expected one of `tcfilter`, `macvtap`, `none`",
        ),
    ];
    for (a, v, want) in cases {
        let mut c = cfg(all);
        let e = apply(&mut c, &[(&a, v)]).unwrap_err().to_string();
        assert!(e.starts_with(&format!("annotation {a} = {v:?}: ")), "{e}");
        assert!(e.contains(want), "{a}: {e}");
        assert_eq!(c, cfg(all), "unchanged after an error");
    }
}

#[test]
fn config_annotations_are_revalidated() {
    let mut c = cfg("enable_annotations = [\".*\"]\ndefault_maxvcpus = 2");
    let before = c.clone();
    let e = apply(
        &mut c,
        &[(&hv("default_memory"), "1024"), (&hv("default_vcpus"), "8")],
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "annotation io.katacontainers.config.hypervisor.default_vcpus: \
         hypervisor.qemu.default_vcpus = 8: more than default_maxvcpus = 2"
    );
    assert_eq!(c, before, "nothing applied");
    for (key, v, want) in [
        (
            "default_memory",
            "10",
            "hypervisor.qemu.default_memory = 10",
        ),
        (
            "machine_type",
            "virt",
            "hypervisor.qemu.machine_type = \"virt\"",
        ),
        ("virtio_fs_cache_size", "64", "DAX is not supported"),
        (
            "default_max_vcpus",
            "1000",
            "hypervisor.qemu.default_maxvcpus = 1000",
        ),
    ] {
        let e = apply(&mut c, &[(&hv(key), v)]).unwrap_err();
        assert!(
            matches!(&e, ConfigError::AnnotationInvalid { problem, .. } if problem.to_string().contains(want)),
            "{e}"
        );
    }
    let e = apply(
        &mut c,
        &[("io.katacontainers.config.runtime.experimental", "newstore")],
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown feature"), "{e}");
}

#[test]
fn config_annotations_kernel_params_and_extra_args_append() {
    let mut c = cfg(
        "enable_annotations = [\"kernel_params\", \"virtio_fs_extra_args\"]\n\
         kernel_params = \"quiet\"\nvirtio_fs_extra_args = [\"--xattr\"]",
    );
    apply(
        &mut c,
        &[
            (&hv("kernel_params"), " agent.log=debug "),
            (
                &hv("virtio_fs_extra_args"),
                "[\"--thread-pool-size=4\", \"--announce-submounts\"]",
            ),
        ],
    )
    .unwrap();
    let q = &c.hypervisor.qemu;
    assert_eq!(q.kernel_params, "quiet agent.log=debug");
    assert_eq!(
        q.virtio_fs_extra_args,
        ["--xattr", "--thread-pool-size=4", "--announce-submounts"]
    );
    for bad in [
        "--thread-pool-size=",
        "--thread-pool-size=x",
        "--seccomp=allow",
        "--allow-setid",
    ] {
        let v = serde_json::to_string(&[bad]).unwrap();
        let e = apply(&mut c, &[(&hv("virtio_fs_extra_args"), &v)]).unwrap_err();
        assert!(matches!(e, ConfigError::BadAnnotation { .. }), "{bad}: {e}");
    }
}

#[test]
fn config_annotations_paths_must_match_globs() {
    let base = "enable_annotations = [\"path\", \"virtio_fs_daemon\", \"kernel\", \"initrd\"]";
    // No globs: no path may be chosen.
    let mut c = cfg(base);
    let e = apply(&mut c, &[(&hv("path"), "/usr/bin/qemu-system-x86_64")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "annotation io.katacontainers.config.hypervisor.path = \"/usr/bin/qemu-system-x86_64\": \
         hypervisor.qemu.valid_hypervisor_paths is empty in /etc/kata-containers/configuration.toml: \
         no annotation may choose this path"
    );

    let mut c = cfg(&format!(
        "{base}\nvalid_hypervisor_paths = [\"/usr/bin/qemu-system-*\"]\n\
         valid_virtio_fs_daemon_paths = [\"/usr/libexec/kata-virtiofsd-v?\"]"
    ));
    apply(
        &mut c,
        &[
            (&hv("path"), "/usr/bin/qemu-system-x86_64"),
            (&hv("virtio_fs_daemon"), "/usr/libexec/kata-virtiofsd-v2"),
            (&hv("kernel"), "/opt/guest/vmlinuz"),
            (&hv("initrd"), "/opt/guest/initrd.img"),
        ],
    )
    .unwrap();
    let q = &c.hypervisor.qemu;
    assert_eq!(q.path, PathBuf::from("/usr/bin/qemu-system-x86_64"));
    assert_eq!(
        q.virtio_fs_daemon,
        PathBuf::from("/usr/libexec/kata-virtiofsd-v2")
    );
    assert_eq!(q.kernel, PathBuf::from("/opt/guest/vmlinuz"));

    for (key, v) in [
        ("path", "/usr/bin/qemu-img"),
        ("path", "/usr/bin/qemu-system-x/../../../tmp/q"),
        ("path", "/usr/bin/qemu-system-x/y"),
        ("virtio_fs_daemon", "/usr/libexec/kata-virtiofsd-v10"),
        ("virtio_fs_daemon", "/tmp/kata-virtiofsd-v2"),
    ] {
        let e = apply(&mut c, &[(&hv(key), v)]).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::AnnotationPathNotAllowed { .. } | ConfigError::BadAnnotation { .. }
            ),
            "{key} = {v}: {e}"
        );
    }
    let e = apply(&mut c, &[(&hv("path"), "/usr/bin/qemu-img")]).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("does not match hypervisor.qemu.valid_hypervisor_paths = [\"/usr/bin/qemu-system-*\"] in /etc/kata-containers/configuration.toml"),
        "{e}"
    );
}

#[test]
fn config_glob_matching() {
    let yes = [
        ("/usr/bin/qemu-*", "/usr/bin/qemu-system-x86_64"),
        ("/usr/bin/qemu-*", "/usr/bin/qemu-"),
        ("/usr/*/qemu", "/usr/bin/qemu"),
        ("/a/?", "/a/b"),
        ("/a/[bc]d", "/a/cd"),
        ("/a/[a-c]", "/a/b"),
        ("/a/[!a-c]", "/a/d"),
        ("/a/*x*y", "/a/zzxzzy"),
        ("/a/\\*", "/a/*"),
        ("/exact", "/exact"),
        ("/a/[b", "/a/[b"),
    ];
    for (p, s) in yes {
        assert!(glob_match(p, s), "{p} should match {s}");
    }
    let no = [
        ("/usr/bin/qemu-*", "/usr/bin/qemu-x/y"),
        ("/usr/bin/qemu-*", "/usr/bin/qemu"),
        ("/usr/*/qemu", "/usr/a/b/qemu"),
        ("/a/?", "/a/"),
        ("/a/?", "/a/bc"),
        ("/a/[!a-c]", "/a/b"),
        ("/a/[a-c]", "/a//"),
        ("/a/\\*", "/a/b"),
        ("/exact", "/exact2"),
        ("/a/*/", "/a/b"),
    ];
    for (p, s) in no {
        assert!(!glob_match(p, s), "{p} should not match {s}");
    }
}

#[test]
fn the_policy_annotation_is_decoded() {
    let mut c = cfg("");
    // "package agent_policy\n"
    apply(
        &mut c,
        &[(
            "io.katacontainers.config.agent.policy",
            "cGFja2FnZSBhZ2VudF9wb2xpY3kK",
        )],
    )
    .unwrap();
    assert_eq!(
        c.agent.kata.policy.as_deref(),
        Some("package agent_policy\n")
    );
    let long = "A".repeat(10_000) + "!";
    let e = apply(&mut c, &[("io.katacontainers.config.agent.policy", &long)])
        .unwrap_err()
        .to_string();
    assert!(e.len() < 400 && e.contains("(10001 bytes)"), "{e}");
}
