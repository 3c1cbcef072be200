//! The documentation site (`make docs`, which `make test` runs first): every
//! page built, nothing loaded from the network, and the How-it-works page
//! looked at in headless Chromium, its mermaid diagrams rendered (the
//! theme swaps each diagram's source for the rendered SVG once mermaid has
//! drawn it; a diagram mermaid cannot parse keeps its source) and a
//! screenshot taken (target/site-screenshots/how-it-works.png).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kata_tests::containerd::{require_tool, run_bounded};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

fn site() -> PathBuf {
    let site = repo().join("target/site");
    assert!(
        site.join("index.html").exists(),
        "{} has no site: build it with `make docs` (`make test` does)",
        site.display()
    );
    site
}

/// Headless Chromium on `page` (a file URL: the site works offline), with
/// `args` (`--dump-dom`, `--screenshot=...`); its stdout.
fn chromium(page: &Path, args: &[&str]) -> String {
    let bin = require_tool("chromium");
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--window-size=1280,2600",
        // time for mermaid to draw before the DOM or the picture is taken
        "--virtual-time-budget=15000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .arg(format!("file://{}", page.display()));
    let out = run_bounded(cmd, None, Duration::from_secs(120)).expect("run chromium");
    assert!(
        out.status.success(),
        "chromium {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_page_is_built_and_offline() {
    let site = site();
    let docs = repo().join("docs");
    let mut pages = vec![];
    for dir in [docs.clone(), docs.join("install"), docs.join("reference")] {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "md") {
                pages.push(p.strip_prefix(&docs).unwrap().with_extension("html"));
            }
        }
    }
    assert!(pages.len() >= 18, "{pages:?}");
    for page in &pages {
        let html = std::fs::read_to_string(site.join(page))
            .unwrap_or_else(|e| panic!("{} was not built: {e}", page.display()));
        for needle in [
            "<script src=\"http",
            "<link href=\"http",
            "rel=\"stylesheet\" href=\"http",
        ] {
            assert!(
                !html.contains(needle),
                "{} loads from the network ({needle})",
                page.display()
            );
        }
    }
    // the configuration reference is generated, with every section
    let reference =
        std::fs::read_to_string(site.join("reference/configuration-keys.html")).unwrap();
    for section in ["[hypervisor.qemu]", "[agent.kata]", "[runtime]"] {
        assert!(reference.contains(section), "{section} missing");
    }
}

#[test]
fn how_it_works_renders_its_diagrams() {
    let site = site();
    let source = std::fs::read_to_string(repo().join("docs/how-it-works.md")).unwrap();
    let diagrams = source.matches("```mermaid").count();
    assert!(diagrams >= 3, "the page has {diagrams} diagrams");
    let page = site.join("how-it-works.html");
    let built = std::fs::read_to_string(&page).unwrap();
    assert_eq!(built.matches("<pre class=\"mermaid\">").count(), diagrams);
    assert!(
        built.contains("js/mermaid.min.js"),
        "mermaid is served by the site"
    );

    let dom = chromium(&page, &["--dump-dom"]);
    assert!(
        dom.contains("How a pod comes up"),
        "not the page: {}",
        &dom[..dom.len().min(500)]
    );
    let left = dom.matches("<pre class=\"mermaid\">").count();
    assert_eq!(
        left, 0,
        "{left} of {diagrams} diagrams were not rendered (a mermaid syntax error?)"
    );
    assert_eq!(
        dom.matches("<div class=\"mermaid\">").count(),
        diagrams,
        "every diagram replaced by its drawing"
    );

    let shots = repo().join("target/site-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("how-it-works.png");
    let _ = std::fs::remove_file(&png);
    chromium(&page, &[&format!("--screenshot={}", png.display())]);
    let bytes = std::fs::read(&png).expect("the screenshot");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1280, 2600));
    // a page of text and three drawings, not a blank or error page
    assert!(
        bytes.len() > 100_000,
        "the screenshot has {} bytes",
        bytes.len()
    );
    eprintln!("screenshot: {} ({} bytes)", png.display(), bytes.len());
}
