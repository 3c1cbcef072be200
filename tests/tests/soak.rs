//! A short soak (20 pod lifecycles, 4 at a time, most with a fault) through
//! the private containerd: no leak, no hung ctr call, no failure a fault
//! does not explain, containerd answering all along. `make soak` runs the
//! long one (KATA_SOAK_LIFECYCLES=200) and writes docs/reliability.md
//! (KATA_SOAK_REPORT).

use kata_tests::containerd::Containerd;
use kata_tests::soak::{self, Fault, Options};

#[test]
fn a_soak_of_pod_lifecycles_with_faults_leaks_nothing_and_never_hangs() {
    kata_tests::require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = soak::write_config(&tmp.path().join("configuration.toml"));
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let options = Options::from_env(20);
    eprintln!("soak: {options:?}");
    let report = soak::run(&c, &image, &options);
    let table = report.table();
    println!("{table}");
    if let Ok(page) = std::env::var("KATA_SOAK_REPORT") {
        soak::write_page(std::path::Path::new(&page), &report).expect("write the soak report");
    }
    assert_eq!(report.outcomes.len(), options.lifecycles);
    assert!(
        report
            .outcomes
            .iter()
            .any(|o| o.plan.fault != Fault::None && o.start_s.is_some()),
        "the soak faulted pods that had started:\n{table}"
    );
    let problems = report.problems();
    assert!(
        problems.is_empty(),
        "the soak found (seed {}):\n  {}\n{table}",
        options.seed,
        problems.join("\n  ")
    );
}
