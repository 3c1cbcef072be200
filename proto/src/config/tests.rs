use std::io::Write;

use super::*;

/// The packaged default file.
const PACKAGED: &str = include_str!("../../../config/configuration.toml");

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap();
    p
}

fn err(text: &str) -> String {
    Config::parse(text).unwrap_err().to_string()
}

#[test]
fn config_defaults_and_keys() {
    let c = Config::parse(
        "[hypervisor.qemu]\npath = \"/usr/bin/q\"\ndefault_memory = 256\naccelerator = \"tcg\"\n[agent.kata]\ndial_timeout = 5\n",
    )
    .unwrap();
    assert_eq!(c.hypervisor.qemu.path, PathBuf::from("/usr/bin/q"));
    assert_eq!(c.hypervisor.qemu.default_memory, 256);
    assert_eq!(c.hypervisor.qemu.default_vcpus, 1);
    assert_eq!(c.agent.kata.dial_timeout, 5);
    assert_eq!(c.runtime, Runtime::default());
    assert_eq!(c.source(), None);
    assert_eq!(Config::parse("").unwrap(), Config::default());
}

#[test]
fn config_every_key_parses() {
    let c = Config::parse(
        r#"
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
kernel = "/k/vmlinuz"
initrd = "/k/initrd.img"
machine_type = "microvm"
max_concurrent_boots = 3
kernel_params = "quiet"
default_vcpus = 2
default_maxvcpus = 4
default_memory = 1024
memory_slots = 4
shared_fs = "none"
virtio_fs_daemon = "/usr/libexec/kata-virtiofsd"
virtio_fs_cache = "never"
virtio_fs_extra_args = ["--thread-pool-size=2", "--xattr"]
virtio_fs_cache_size = 0
enable_debug = true
enable_annotations = ["default_memory", "kernel_.*"]
valid_hypervisor_paths = ["/usr/bin/qemu-*"]
valid_virtio_fs_daemon_paths = ["/usr/libexec/*"]
accelerator = "kvm"
launcher = "/usr/local/bin/kata-vmm-launcher"

[agent.kata]
dial_timeout = 10
enable_debug = true
debug_console_enabled = true
kernel_modules = ["e1000e EEE=1", "i915"]
enable_tracing = true

[runtime]
enable_debug = true
internetworking_model = "none"
sandbox_cgroup_only = true
disable_guest_seccomp = true
disable_new_netns = true
enable_pprof = true
static_sandbox_resource_mgmt = false
experimental = []
"#,
    )
    .unwrap();
    let q = &c.hypervisor.qemu;
    assert_eq!(q.machine_type, "microvm");
    assert_eq!(q.max_concurrent_boots, 3);
    assert_eq!((q.default_vcpus, q.default_maxvcpus), (2, 4));
    assert_eq!(q.shared_fs, SharedFs::None);
    assert_eq!(q.virtio_fs_cache, VirtioFsCache::Never);
    assert_eq!(q.virtio_fs_cache.virtiofsd_arg(), "none");
    assert_eq!(q.virtio_fs_extra_args.len(), 2);
    assert_eq!(q.enable_annotations, ["default_memory", "kernel_.*"]);
    assert_eq!(
        q.launcher_path().unwrap(),
        PathBuf::from("/usr/local/bin/kata-vmm-launcher")
    );
    assert_eq!(c.agent.kata.kernel_modules, ["e1000e EEE=1", "i915"]);
    assert!(c.agent.kata.enable_tracing);
    let r = &c.runtime;
    assert_eq!(r.internetworking_model, InterworkingModel::None);
    assert!(r.sandbox_cgroup_only && r.disable_new_netns && r.enable_pprof);
    assert!(!r.static_sandbox_resource_mgmt);
}

#[test]
fn config_cache_names() {
    for (name, mode, arg) in [
        ("auto", VirtioFsCache::Auto, "auto"),
        ("always", VirtioFsCache::Always, "always"),
        ("never", VirtioFsCache::Never, "none"),
        ("none", VirtioFsCache::Never, "none"),
    ] {
        let c = Config::parse(&format!(
            "[hypervisor.qemu]\nvirtio_fs_cache = \"{name}\"\n"
        ))
        .unwrap();
        assert_eq!(c.hypervisor.qemu.virtio_fs_cache, mode);
        assert_eq!(mode.virtiofsd_arg(), arg);
    }
    assert_eq!(VirtioFsCache::Never.as_str(), "never");
    let q = Qemu::default();
    assert_eq!(q.virtiofsd_cache_mode(), "auto");
    assert!(q.shared_fs == "virtio-fs" && q.shared_fs != "none");
    assert_eq!(SharedFs::None.to_string(), "none");
    assert_eq!(InterworkingModel::TcFilter.to_string(), "tcfilter");
    assert!(VirtioFsCache::Always == "always");
    let e = err("[hypervisor.qemu]\nvirtio_fs_cache = \"metadata\"\n");
    assert!(
        e.starts_with("hypervisor.qemu.virtio_fs_cache: unknown variant"),
        "{e}"
    );
}

#[test]
fn config_vcpus_accepts_kata_fractions() {
    let c = Config::parse("[hypervisor.qemu]\ndefault_vcpus = 1.5\n").unwrap();
    assert_eq!(c.hypervisor.qemu.default_vcpus, 2);
    let e = err("[hypervisor.qemu]\ndefault_vcpus = -1\n");
    assert!(
        e.starts_with("hypervisor.qemu.default_vcpus: invalid value"),
        "{e}"
    );
}

#[test]
fn config_errors_name_the_key() {
    assert_eq!(
        err("[hypervisor.qemu]\ndefault_memory = \"big\"\n"),
        "hypervisor.qemu.default_memory: invalid type: string \"big\", expected u64"
    );
    assert_eq!(
        err("[hypervisor.qemu]\ndefault_memroy = 256\n"),
        "hypervisor.qemu.default_memroy: unknown key (did you mean default_memory?)"
    );
    let cases = [
        (
            "[hypervisor.qemu]\nenable_debug = 1\n",
            "hypervisor.qemu.enable_debug: invalid type",
        ),
        (
            "[hypervisor.qemu]\nshared_fs = \"virtio-9p\"\n",
            "hypervisor.qemu.shared_fs: unknown variant",
        ),
        (
            "[hypervisor.qemu]\nenable_annotations = \"x\"\n",
            "hypervisor.qemu.enable_annotations: invalid type",
        ),
        (
            "[hypervisor.clh]\npath = \"/x\"\n",
            "hypervisor.clh: unknown section",
        ),
        ("[factory]\ntemplate = true\n", "factory: unknown key"),
        ("debug = true\n", "debug: unknown key"),
        ("hypervisor = 1\n", "hypervisor: expected a table"),
        (
            "[agent.kata]\ndial_timeout = -1\n",
            "agent.kata.dial_timeout: invalid value",
        ),
        (
            "[agent.kata]\nkernel_modules = [1]\n",
            "agent.kata.kernel_modules: invalid type",
        ),
        ("[agent.other]\n", "agent.other: unknown section"),
        (
            "[runtime]\ninternetworking_model = \"bridged\"\n",
            "runtime.internetworking_model: unknown variant",
        ),
        (
            "[runtime]\nenable_debug = \"yes\"\n",
            "runtime.enable_debug: invalid type",
        ),
        (
            "[runtime]\njaeger_thrift = \"x\"\n",
            "runtime.jaeger_thrift: unknown key",
        ),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(e.starts_with(want), "{text:?}: {e}");
    }
}

#[test]
fn config_semantic_errors_name_the_key() {
    let cases = [
        (
            "[hypervisor.qemu]\naccelerator = \"hvf\"\n",
            "hypervisor.qemu.accelerator = \"hvf\"",
        ),
        (
            "[hypervisor.qemu]\nmachine_type = \"virt\"\n",
            "hypervisor.qemu.machine_type = \"virt\"",
        ),
        (
            "[hypervisor.qemu]\nmax_concurrent_boots = -2\n",
            "hypervisor.qemu.max_concurrent_boots = -2",
        ),
        (
            "[hypervisor.qemu]\npath = \"/opt/qemu\"\n",
            "hypervisor.qemu.path = \"/opt/qemu\": must be under /usr",
        ),
        (
            "[hypervisor.qemu]\nkernel = \"vmlinuz\"\n",
            "hypervisor.qemu.kernel = \"vmlinuz\": must be an absolute path",
        ),
        (
            "[hypervisor.qemu]\ninitrd = \"/a/../b\"\n",
            "hypervisor.qemu.initrd = \"/a/../b\"",
        ),
        (
            "[hypervisor.qemu]\nlauncher = \"bin/l\"\n",
            "hypervisor.qemu.launcher = \"bin/l\"",
        ),
        (
            "[hypervisor.qemu]\nvirtio_fs_daemon = \"./d\"\n",
            "hypervisor.qemu.virtio_fs_daemon = \"./d\"",
        ),
        (
            "[hypervisor.qemu]\ndefault_vcpus = 0\n",
            "hypervisor.qemu.default_vcpus = 0",
        ),
        (
            "[runtime]\njaeger_endpoint = \"localhost:4317\"\n",
            "runtime.jaeger_endpoint = \"localhost:4317\": must be an OTLP/gRPC URL",
        ),
        (
            "[agent.kata]\ntrace_forwarder = \"fwd\"\n",
            "agent.kata.trace_forwarder = \"fwd\"",
        ),
        (
            "[hypervisor.qemu]\ndefault_vcpus = 4\ndefault_maxvcpus = 2\n",
            "hypervisor.qemu.default_vcpus = 4: more than default_maxvcpus = 2",
        ),
        (
            "[hypervisor.qemu]\ndefault_maxvcpus = 1000\n",
            "hypervisor.qemu.default_maxvcpus = 1000",
        ),
        (
            "[hypervisor.qemu]\ndefault_memory = 16\n",
            "hypervisor.qemu.default_memory = 16",
        ),
        (
            "[hypervisor.qemu]\nvirtio_fs_cache_size = 1024\n",
            "hypervisor.qemu.virtio_fs_cache_size = 1024: DAX is not supported",
        ),
        (
            "[hypervisor.qemu]\nvirtio_fs_extra_args = [\"--cache=always\"]\n",
            "hypervisor.qemu.virtio_fs_extra_args[0] = \"--cache=always\"",
        ),
        (
            "[hypervisor.qemu]\nenable_annotations = [\"ok\", \"(\"]\n",
            "hypervisor.qemu.enable_annotations[1] = \"(\": not a regular expression",
        ),
        (
            "[hypervisor.qemu]\nvalid_hypervisor_paths = [\"qemu*\"]\n",
            "hypervisor.qemu.valid_hypervisor_paths[0] = \"qemu*\"",
        ),
        (
            "[agent.kata]\ndial_timeout = 0\n",
            "agent.kata.dial_timeout = 0",
        ),
        (
            "[agent.kata]\nkernel_modules = [\"a/b\"]\n",
            "agent.kata.kernel_modules[0] = \"a/b\"",
        ),
        (
            "[agent.kata]\nkernel_modules = [\" \"]\n",
            "agent.kata.kernel_modules[0] = \" \": empty",
        ),
        (
            "[runtime]\nexperimental = [\"newstore\"]\n",
            "runtime.experimental[0] = \"newstore\": unknown feature",
        ),
        (
            "[runtime]\ndisable_new_netns = true\n",
            "runtime.disable_new_netns = true: needs internetworking_model = \"none\"",
        ),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(e.starts_with(want), "{text:?}: {e}");
    }
}

#[test]
fn config_syntax_error_has_the_line() {
    let e = err("[hypervisor.qemu]\npath = /usr/bin/q\n");
    assert!(e.starts_with("TOML syntax error at line 2"), "{e}");
}

#[test]
fn config_load_names_the_file() {
    let e = Config::load(Path::new("/nonexistent/kata.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("configuration /nonexistent/kata.toml: "),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "c.toml",
        "[hypervisor.qemu]\ndefault_memory = \"big\"\n",
    );
    let e = Config::load(&p).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "configuration {}: hypervisor.qemu.default_memory: invalid type: string \"big\", expected u64",
            p.display()
        )
    );
    let p = write(dir.path(), "ok.toml", "[runtime]\nenable_debug = true\n");
    assert_eq!(Config::load(&p).unwrap().source(), Some(p.as_path()));
}

#[test]
fn config_packaged_file_is_the_defaults() {
    let c = Config::parse(PACKAGED).unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn config_serializes_back() {
    let text = toml::to_string(&Config::default()).unwrap();
    assert_eq!(Config::parse(&text).unwrap(), Config::default());
}

#[test]
fn config_lookup_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let explicit = write(
        d,
        "explicit.toml",
        "[hypervisor.qemu]\ndefault_memory = 100\n",
    );
    let env = write(d, "env.toml", "[hypervisor.qemu]\ndefault_memory = 200\n");
    let etc = write(d, "etc.toml", "[hypervisor.qemu]\ndefault_memory = 300\n");
    let share = write(d, "share.toml", "[hypervisor.qemu]\ndefault_memory = 400\n");
    let missing = d.join("missing.toml");
    let search = [etc.as_path(), share.as_path()];
    let mem = |r: Result<(Config, Option<PathBuf>), ConfigError>| {
        let (c, src) = r.unwrap();
        assert_eq!(c.source(), src.as_deref());
        (c.hypervisor.qemu.default_memory, src)
    };
    assert_eq!(
        mem(Config::discover_in(
            Some(&explicit),
            Some(env.clone().into()),
            &search
        )),
        (100, Some(explicit.clone()))
    );
    assert_eq!(
        mem(Config::discover_in(None, Some(env.clone().into()), &search)),
        (200, Some(env.clone()))
    );
    assert_eq!(
        mem(Config::discover_in(None, Some("".into()), &search)),
        (300, Some(etc.clone()))
    );
    assert_eq!(
        mem(Config::discover_in(
            None,
            None,
            &[missing.as_path(), share.as_path()]
        )),
        (400, Some(share.clone()))
    );
    assert_eq!(
        mem(Config::discover_in(None, None, &[missing.as_path()])),
        (512, None)
    );
    // A named file that does not exist is an error, not a fall-back.
    let e = Config::discover_in(None, Some(missing.clone().into()), &search).unwrap_err();
    assert!(e.to_string().contains("missing.toml"), "{e}");
    let e = Config::discover_in(Some(&missing), None, &search).unwrap_err();
    assert!(e.to_string().contains("missing.toml"), "{e}");

    // The real environment variable (the only test that touches it).
    std::env::set_var(CONF_FILE_ENV, &env);
    let got = Config::discover_with_source(None);
    let explicit_wins = Config::discover(Some(&explicit));
    std::env::remove_var(CONF_FILE_ENV);
    assert_eq!(mem(got), (200, Some(env.clone())));
    assert_eq!(explicit_wins.unwrap().hypervisor.qemu.default_memory, 100);
}

#[test]
fn config_check_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let exe = |name: &str| {
        let p = write(d, name, "#!/bin/sh\n");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    };
    let mut c = Config::default();
    let q = &mut c.hypervisor.qemu;
    q.path = exe("qemu");
    q.kernel = write(d, "vmlinuz", "k");
    q.initrd = write(d, "initrd.img", "i");
    q.launcher = exe("kata-vmm-launcher");
    q.virtio_fs_daemon = exe("kata-virtiofsd");
    c.check_files().unwrap();

    c.hypervisor.qemu.kernel = "/nope".into();
    c.hypervisor.qemu.initrd = d.to_path_buf();
    c.hypervisor.qemu.virtio_fs_daemon = write(d, "not-exec", "x");
    let e = c.check_files().unwrap_err().to_string();
    assert!(
        e.contains("hypervisor.qemu.kernel = \"/nope\": the file does not exist"),
        "{e}"
    );
    assert!(
        e.contains("hypervisor.qemu.initrd = ") && e.contains("not a regular file"),
        "{e}"
    );
    assert!(
        e.contains("hypervisor.qemu.virtio_fs_daemon = ") && e.contains("not executable"),
        "{e}"
    );
    // Without virtio-fs the daemon is not needed.
    c.hypervisor.qemu.shared_fs = SharedFs::None;
    let e = c.check_files().unwrap_err().to_string();
    assert!(!e.contains("virtio_fs_daemon"), "{e}");
}

#[test]
fn config_helper_lookup() {
    let q = Qemu::default();
    // Empty: next to the running program, else $PATH; either way the name.
    match q.launcher_path() {
        Ok(p) => assert!(p.ends_with(LAUNCHER_NAME), "{p:?}"),
        Err(e) => assert!(
            e.to_string().starts_with(
                "hypervisor.qemu.launcher is empty and kata-vmm-launcher is neither next to"
            ),
            "{e}"
        ),
    }
    match q.virtio_fs_daemon_path() {
        Ok(p) => assert!(p.ends_with(VIRTIOFSD_NAME), "{p:?}"),
        Err(e) => assert!(
            e.to_string()
                .starts_with("hypervisor.qemu.virtio_fs_daemon is empty"),
            "{e}"
        ),
    }
}

#[test]
fn config_clean_paths() {
    for ok in ["/usr/bin/qemu", "/a", "/tmp/.hidden/x"] {
        assert!(is_clean_absolute(Path::new(ok)), "{ok}");
    }
    for bad in ["", "usr/bin", "/a/../b", "/a/./b", "/a//b", "/..", "/a/.."] {
        assert!(!is_clean_absolute(Path::new(bad)), "{bad}");
    }
}

#[test]
fn config_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "c.toml",
        "[hypervisor.qemu]\ndefault_memory = 32\n",
    );
    let e = Config::load(&p).unwrap_err();
    assert!(
        matches!(&e, ConfigError::BadValue { file: Some(f), key, value, .. }
            if f == &p && key == "hypervisor.qemu.default_memory" && value == "32"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "configuration {}: hypervisor.qemu.default_memory = 32: the guest needs at least {MIN_MEMORY_MIB} MiB",
            p.display()
        )
    );
    let p = write(dir.path(), "k.toml", "[runtime]\nenable_debgu = true\n");
    let e = Config::load(&p).unwrap_err();
    assert!(
        matches!(&e, ConfigError::Parse { file: Some(f), key: Some(k), .. }
            if f == &p && k == "runtime.enable_debgu"),
        "{e:?}"
    );
    let e = Config::parse("[runtime\n").unwrap_err();
    assert!(
        matches!(
            &e,
            ConfigError::Parse {
                file: None,
                key: None,
                ..
            }
        ),
        "{e:?}"
    );
    let e = Config::load(&dir.path().join("missing.toml")).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");

    let mut c = Config::default();
    c.hypervisor.qemu.path = "/nope/qemu".into();
    c.hypervisor.qemu.kernel = "/nope/kernel".into();
    match c.check_files().unwrap_err() {
        ConfigError::Several(all) => {
            assert!(all.iter().any(|e| matches!(e,
                ConfigError::MissingFile { key, .. } if key == "hypervisor.qemu.kernel")));
        }
        e => panic!("{e:?}"),
    }
}
